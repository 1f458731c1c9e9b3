"""What the three RLHF commands share: data preparation, the workdir's tokenizer, loading weights from
another step's workdir, and the start of steps 1 and 2 (the engine does the rest).

A step's workdir holds `metrics.jsonl`, `tensorboard/`, `checkpoints/` and `data/`: the tokenizer
(`data/tokenizer.model` or `data/tokenizer.json`, where `python -m jaxllm.generate` also looks) and,
for the synthetic task, the generated JSONL files. Each checkpoint's `meta` records the model
settings, the step (`rlhf.stage`) and the tokenizer's SHA-256, which later steps compare.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxllm import mesh as mesh_lib
from jaxllm import runtime
from jaxllm.config import ModelConfig
from jaxllm.data.pipeline import make_train_iterator, padded_eval_batches
from jaxllm.data.shards import file_sha256
from jaxllm.data.tokenizer import (
    HF_FILE,
    SENTENCEPIECE_FILE,
    TextTokenizer,
    install_tokenizer,
    load_tokenizer,
    train_tokenizer,
    workdir_tokenizer_file,
)
from jaxllm.engine.checkpoint import SHAPE_KEYS, Checkpointer, model_config, model_meta, run_meta, saved_steps
from jaxllm.engine.state import ParamTree
from jaxllm.errors import UserError
from jaxllm.rlhf import synthetic
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import Record, read_records, stage_records, tokenizer_corpus

# ---------------------------------------------------------------------------------------------------
# Data


def load_records(config: RLHFConfig, workdir: Path) -> tuple[list[Record], list[Record] | None]:
    """(training rows, held-out rows or None) of the whole dataset, before the per-step split."""
    data = config.data
    if data.source == "synthetic":
        directory = workdir / "data"
        if jax.process_index() == 0:
            synthetic.write_dataset(directory, data.synthetic_rows, data.synthetic_eval_rows, config.seed)
        runtime.barrier("synthetic data")
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


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_meta(tokenizer: TextTokenizer) -> dict[str, Any]:
    return {"file": Path(tokenizer.path).name, "sha256": file_sha256(tokenizer.path),
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
        if source is not None and file_sha256(source) != file_sha256(existing):
            raise UserError(f"workdir '{workdir}' already holds tokenizer {existing}, which differs from the one of "
                            f"{where} ({source}); use another --workdir")
        return load_tokenizer(existing)
    return install_tokenizer(workdir, source, lambda prefix: train_tokenizer(tokenizer_corpus(records), prefix,
                                                                             config.model.vocab_size))


# ---------------------------------------------------------------------------------------------------
# Models from workdirs


def model_from_meta(saved: dict[str, Any], user: ModelConfig, where: str) -> ModelConfig:
    """The checkpoint's architecture with the user's compute settings (`compute_dtype`, `remat`,
    `attention_implementation`).

    A shape key the user set to something other than its default and the checkpoint's value is an
    error naming both; keys left at their defaults take the checkpoint's values.
    """
    cfg = model_config(saved)
    default, mine = ModelConfig(), model_meta(user)
    for key in SHAPE_KEYS:
        if getattr(user, key) != getattr(default, key) and mine.get(key) != saved.get(key):
            raise UserError(f"config key 'model.{key}': got {mine.get(key)!r}, but {where} holds a model with "
                            f"{saved.get(key)!r}; remove the key or set it to {saved.get(key)!r}")
    cfg = dataclasses.replace(cfg, compute_dtype=user.compute_dtype, remat=user.remat, init_from=None,
                              attention_implementation=user.attention_implementation)
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
        return file_sha256(path) if path is not None else None


def _state_tree(directory: Path, step: int) -> dict[str, Any]:
    """The saved state's tree (leaves: array metadata), read without restoring anything."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Orbax warns that the step-level metadata is not in `state/`
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(directory.absolute() / str(step) / "state")  # Orbax: absolute
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
        step = (saved_steps(directory) or [None])[-1]
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
        placed = ParamTree.of(model_def).placed(mesh, mesh_lib.param_drop(zero_stage))
        params = ckpt.restore_part(step, {"params": placed})["params"]
    finally:
        ckpt.close()
    return Source(workdir, step, cfg, params, meta)


def check_tokenizer_fits(tokenizer: TextTokenizer, cfg: ModelConfig, what: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but {what} has only "
                        f"model.vocab_size={cfg.vocab_size} embedding rows")


# ---------------------------------------------------------------------------------------------------
# Starting a step


@dataclasses.dataclass
class Stage:
    """What steps 1 and 2 start from: the mesh, their rows, the tokenizer and the model settings."""

    mesh: Mesh
    records: list[Record]
    train_rows: list[Record]
    held_out: list[Record]
    tokenizer: TextTokenizer
    source: Source | None  # the weights of the `init_workdir`, if one is named
    model: ModelConfig


def fresh_model_config(config: RLHFConfig, tokenizer: TextTokenizer) -> ModelConfig:
    """The `model` section for a model trained from scratch or from `model.init_from`.

    From scratch, a vocabulary size left at its default follows the tokenizer.
    """
    cfg = config.model
    if cfg.init_from:
        from jaxllm.interop import hf

        cfg = hf.resolve_model_config(cfg, cfg.init_from)
    elif cfg.vocab_size == ModelConfig().vocab_size and tokenizer.vocab_size != cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    cfg.validate()
    check_tokenizer_fits(tokenizer, cfg, "the model")
    return cfg


def check_seq_len(config: RLHFConfig, cfg: ModelConfig) -> None:
    if config.data.max_seq_len > cfg.max_len:
        raise UserError(f"config key 'data.max_seq_len': got {config.data.max_seq_len}; expected at most the "
                        f"model's max_len={cfg.max_len}")


def start_stage(config: RLHFConfig, workdir: Path, stage: str, init: str | None, init_key: str) -> Stage:
    """Starts the runtime and prepares step 1 or 2: its share of the data, its tokenizer, and the model it
    trains, from `init` (a workdir named by `init_key`), `model.init_from` or from scratch."""
    mesh = runtime.start(config)
    runtime.make_directory(workdir)
    runtime.check_rows_divide(config.train.batch_size, mesh, "train.batch_size", config.train.grad_accum)
    records, eval_records = load_records(config, workdir)
    train_rows, held_out = stage_split(config, records, eval_records, stage)
    tokenizer = setup_tokenizer(config, workdir, init, records)
    with jax.set_mesh(mesh):
        source = load_source(init, init_key, "decoder", mesh, config.mesh.zero_stage, config.model) if init else None
    cfg = source.model if source else fresh_model_config(config, tokenizer)
    check_tokenizer_fits(tokenizer, cfg, f"the model of {init}" if init else "the model")
    check_seq_len(config, cfg)
    return Stage(mesh, records, train_rows, held_out, tokenizer, source, cfg)


def stage_batches(config: RLHFConfig, mesh: Mesh, rows: Any, held_out: Any, what: str) -> tuple[Any, list]:
    """Reports step 1's or 2's training and held-out rows, checks that the training rows (`what`) fill a
    batch, and returns the checkpointable training iterator and the padded held-out batches."""
    batch_size = config.train.batch_size
    say(rows.report.line())
    if len(rows) < batch_size:
        raise UserError(f"config key 'train.batch_size': {batch_size} exceeds the {len(rows)} {what} left after "
                        "data_split")
    if len(held_out):
        say(held_out.report.line())
    slot, slots = runtime.data_slot(mesh, (batch_size, config.data.max_seq_len))
    batches = padded_eval_batches(held_out, batch_size, config.eval.batches, slot, slots) if len(held_out) else []
    return make_train_iterator(rows, batch_size, config.seed, slot, slots), batches


def stage_meta(cfg: ModelConfig, optimizer_state: dict[str, Any] | None, stage: str, tokenizer: TextTokenizer,
               **extra: Any) -> dict[str, Any]:
    """A step's checkpoint meta: `jaxllm.engine.checkpoint.run_meta` with the step and its tokenizer."""
    return run_meta(cfg, optimizer_state, rlhf={"stage": stage, "tokenizer": tokenizer_meta(tokenizer), **extra})


def say(text: str) -> None:
    """A line for the user on process 0 (data reports, summaries)."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)
