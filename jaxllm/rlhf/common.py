"""What the three RLHF commands share: data preparation, the workdir's tokenizer, loading weights from
another step's workdir, the optimizer, batches onto the mesh, and the metric writer.

A step's workdir holds `metrics.jsonl`, `tensorboard/`, `checkpoints/` and `data/`: the tokenizer
(`data/tokenizer.model` or `data/tokenizer.json`, where `python -m jaxllm.generate` also looks) and,
for the synthetic task, the generated JSONL files. Each checkpoint's `meta` records the model
settings, the step (`rlhf.stage`) and the tokenizer's SHA-256, which later steps compare.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

import jaxllm
from jaxllm import mesh as mesh_lib
from jaxllm.checkpoint import SHAPE_KEYS, Checkpointer
from jaxllm.config import ModelConfig, OptimizerConfig
from jaxllm.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, TextTokenizer, load_tokenizer, train_tokenizer
from jaxllm.errors import UserError
from jaxllm.metrics import MetricsWriter
from jaxllm.optim.schedules import warmup_cosine
from jaxllm.rlhf import synthetic
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import Record, read_records, stage_records, tokenizer_corpus
from jaxllm.state import ModelDef

# ---------------------------------------------------------------------------------------------------
# Data


def load_records(config: RLHFConfig, workdir: Path) -> tuple[list[Record], list[Record] | None]:
    """(training rows, held-out rows or None) of the whole dataset, before the per-step split."""
    data = config.data
    if data.source == "synthetic":
        directory = workdir / "data"
        if jax.process_index() == 0:
            synthetic.write_dataset(directory, data.synthetic_rows, data.synthetic_eval_rows, config.seed)
        _barrier("synthetic data")
        return read_records([directory / "train.jsonl"]), read_records([directory / "eval.jsonl"])
    records = read_records(data.path, "data.path")
    return records, read_records(data.eval_path, "data.eval_path") if data.eval_path else None


def stage_split(config: RLHFConfig, records: list[Record], eval_records: list[Record] | None,
                stage: str) -> tuple[list[Record], list[Record]]:
    """This step's training and held-out rows: `data_split` applied to each file; without a held-out
    file, the last `eval_fraction` of the step's training share."""
    data = config.data
    train = stage_records(records, data.data_split, data.split_seed, stage)
    if eval_records is not None:
        held_out = stage_records(eval_records, data.data_split, data.split_seed, stage)
    elif data.eval_fraction > 0 and len(train) > 1:
        count = max(1, round(data.eval_fraction * len(train)))
        train, held_out = train[:-count], train[-count:]
    else:
        held_out = []
    if not train:
        raise UserError(f"config key 'data.data_split': {data.data_split!r} leaves no training rows for step "
                        f"'{stage}' out of {len(records)}; give this step a positive share")
    return train, held_out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def workdir_tokenizer_file(workdir: str | Path) -> Path | None:
    """The tokenizer file a workdir carries (`data/tokenizer.json` or `data/tokenizer.model`), if any."""
    for name in (HF_FILE, SENTENCEPIECE_FILE):
        path = Path(workdir) / "data" / name
        if path.is_file():
            return path
    return None


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_meta(tokenizer: TextTokenizer) -> dict[str, Any]:
    return {"file": Path(tokenizer.path).name, "sha256": file_digest(tokenizer.path),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}


def setup_tokenizer(config: RLHFConfig, workdir: Path, init_workdir: str | None,
                    records: list[Record]) -> TextTokenizer:
    """The step's tokenizer, copied into `WORKDIR/data/` on the first run and reused on resume.

    In order: `data.tokenizer`; the tokenizer of the workdir the weights come from; the one of a
    `model.init_from` Hugging Face directory; else (a model from scratch) a SentencePiece model of
    `model.vocab_size` pieces trained on every text of the data. A resumed run whose source names a
    different tokenizer than the one the workdir already holds is refused.
    """
    source: Path | None = None
    where = ""
    if config.data.tokenizer:
        source, where = Path(load_tokenizer(config.data.tokenizer).path), f"data.tokenizer '{config.data.tokenizer}'"
    elif init_workdir:
        source = workdir_tokenizer_file(init_workdir)
        if source is None:
            raise UserError(f"workdir '{init_workdir}' has no tokenizer (data/{SENTENCEPIECE_FILE} or "
                            f"data/{HF_FILE}); set data.tokenizer to the one its model was trained with")
        where = f"workdir '{init_workdir}'"
    elif config.model.init_from:
        path = Path(config.model.init_from)
        if any((path / n).is_file() for n in (HF_FILE, SENTENCEPIECE_FILE)):
            source, where = Path(load_tokenizer(path).path), f"model.init_from '{path}'"
    existing = workdir_tokenizer_file(workdir)
    if existing is not None:
        if source is not None and file_digest(source) != file_digest(existing):
            raise UserError(f"workdir '{workdir}' already holds tokenizer {existing}, which differs from the one of "
                            f"{where} ({source}); use another --workdir")
        return load_tokenizer(existing)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        if source is not None:
            target = workdir / "data" / (HF_FILE if source.suffix == ".json" else SENTENCEPIECE_FILE)
            shutil.copyfile(source, target)
        else:
            train_tokenizer(tokenizer_corpus(records), workdir / "data" / "tokenizer", config.model.vocab_size)
    _barrier("tokenizer")
    return load_tokenizer(workdir_tokenizer_file(workdir))


# ---------------------------------------------------------------------------------------------------
# Models from workdirs


def model_meta(cfg: ModelConfig) -> dict[str, Any]:
    """Model settings as saved with a checkpoint, defaults resolved (as `jaxllm.train.model_meta`)."""
    return dataclasses.asdict(cfg) | {"kv_heads": cfg.num_kv_heads, "d_ff": cfg.ffn_dim, "tie_embeddings": cfg.tied}


def model_from_meta(saved: dict[str, Any], user: ModelConfig, where: str) -> ModelConfig:
    """The checkpoint's architecture with the user's compute settings (`compute_dtype`, `remat`).

    A shape key the user set to something other than its default and the checkpoint's value is an
    error naming both; keys left at their defaults take the checkpoint's values.
    """
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    default, mine = ModelConfig(), model_meta(user)
    for key in SHAPE_KEYS:
        if getattr(user, key) != getattr(default, key) and mine.get(key) != saved.get(key):
            raise UserError(f"config key 'model.{key}': got {mine.get(key)!r}, but {where} holds a model with "
                            f"{saved.get(key)!r}; remove the key or set it to {saved.get(key)!r}")
    cfg = dataclasses.replace(cfg, compute_dtype=user.compute_dtype, remat=user.remat, init_from=None)
    cfg.validate()
    return cfg


@dataclasses.dataclass
class Source:
    """Weights read from another step's workdir."""

    workdir: Path
    step: int
    model: ModelConfig
    params: Any
    meta: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.meta.get("rlhf", {}).get("stage", "pre-training")

    @property
    def tokenizer_sha256(self) -> str | None:
        path = workdir_tokenizer_file(self.workdir)
        return file_digest(path) if path is not None else None


def latest_step(directory: Path) -> int | None:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    return steps[-1] if steps else None


def _state_tree(directory: Path, step: int) -> dict[str, Any]:
    """The saved state's tree (leaves: array metadata), read without restoring anything."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Orbax warns that the step-level metadata is not in `state/`
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(directory / str(step) / "state")
    finally:
        absl.setLevel(level)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    return tree if isinstance(tree, dict) else {}


def load_source(workdir: str | Path, key: str, kind: str, mesh: Mesh, zero_stage: int, user: ModelConfig,
                step: int | None = None) -> Source:
    """Parameters of `workdir`'s latest (or given) checkpoint onto `mesh`, with the ZeRO stage's layout.

    `kind` is "decoder" (a language model: a `jaxllm.train` or step-1 workdir) or "value" (a step-2
    reward model with a value head). `key` is the config key that named the workdir, for errors.
    """
    from jaxllm.rlhf.models import VALUE_HEAD, actor_def, value_def

    workdir = Path(workdir)
    directory = workdir / "checkpoints"
    if not workdir.is_dir():
        raise UserError(f"config key '{key}': workdir '{workdir}' does not exist")
    if step is None:
        step = latest_step(directory)
    if step is None:
        raise UserError(f"config key '{key}': workdir '{workdir}' has no checkpoint in {directory}")
    params_tree = _state_tree(directory, step).get("params")
    if not isinstance(params_tree, dict):
        raise UserError(f"config key '{key}': checkpoint '{directory / str(step)}' holds no model parameters")
    has_head = VALUE_HEAD in params_tree
    if kind == "value" and not has_head:
        raise UserError(f"config key '{key}': checkpoint '{directory / str(step)}' has no value head (it is a "
                        "language model); train a reward model first with python -m jaxllm.rlhf reward")
    if kind == "decoder" and has_head:
        raise UserError(f"config key '{key}': checkpoint '{directory / str(step)}' is a reward model (it has a "
                        "value head); the actor starts from a step-1 (sft) workdir")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        meta = ckpt.read_meta(step)
        saved = meta.get("model")
        if not isinstance(saved, dict):
            raise UserError(f"config key '{key}': checkpoint '{directory / str(step)}' records no model settings")
        cfg = model_from_meta(saved, user, f"workdir '{workdir}'")
        model_def = value_def(cfg) if kind == "value" else actor_def(cfg)
        shardings = mesh_lib.tree_shardings(mesh, model_def.logical_axes, model_def.shapes,
                                            mesh_lib.param_drop(zero_stage))
        abstract = {"params": jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh),
                                           model_def.shapes, shardings, is_leaf=is_shape)}
        restore = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract), partial_restore=True)
        params = ckpt.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    finally:
        ckpt.close()
    return Source(workdir, step, cfg, params, meta)


def is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(model_def: ModelDef) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), model_def.shapes, is_leaf=is_shape)


def check_tokenizer_fits(tokenizer: TextTokenizer, cfg: ModelConfig, what: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but {what} has only "
                        f"model.vocab_size={cfg.vocab_size} embedding rows")


# ---------------------------------------------------------------------------------------------------
# Training helpers


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norms, biases or the value head), as jaxllm.optim does."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(opt: OptimizerConfig, lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW on a warm-up + cosine schedule."""
    schedule = warmup_cosine(lr, warmup_steps, total_steps, min_lr_ratio)
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask)
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    return optax.chain(clip, core), schedule


def check_divides(rows: int, mesh: Mesh, key: str) -> None:
    shards = mesh_lib.data_parallel_size(mesh)
    if rows % shards or rows % jax.process_count():
        raise UserError(f"config key '{key}': {rows} rows do not divide over the {shards} data shards "
                        f"(mesh.data x mesh.fsdp) and {jax.process_count()} processes; use a multiple of {shards}")


def batch_sharding(mesh: Mesh, ndim: int) -> jax.sharding.NamedSharding:
    """Rows split over the data-parallel axes; other dimensions whole."""
    return jax.sharding.NamedSharding(mesh, mesh_lib.logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, rows: int) -> dict[str, jax.Array]:
    """A host batch (this process's rows) as global arrays of `rows` rows split over the data axes."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value,
                                                         (rows, *value.shape[1:]))
            for name, value in batch.items()}


def base_meta(cfg: ModelConfig, stage: str, tokenizer: TextTokenizer, **extra: Any) -> dict[str, Any]:
    return {"model": model_meta(cfg), "jaxllm_version": jaxllm.__version__,
            "rlhf": {"stage": stage, "tokenizer": tokenizer_meta(tokenizer), **extra}}


class Writer(MetricsWriter):
    """`jaxllm.metrics.MetricsWriter` whose progress bar shows the step's own headline metrics."""

    def __init__(self, workdir: Path, total: int, start: int, tensorboard: bool, progress_bar: bool,
                 headline: tuple[str, ...]):
        super().__init__(workdir, total, start, tensorboard, progress_bar)
        self.headline = headline

    def write(self, row: dict[str, Any]) -> None:
        super().write(row)
        shown = {k: f"{row[k]:.3g}" for k in self.headline if isinstance(row.get(k), (int, float))}
        if self._bar is not None and shown:
            self._bar.set_postfix(shown, refresh=False)


def say(text: str) -> None:
    """A line for the user on process 0 (data reports, summaries)."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)
