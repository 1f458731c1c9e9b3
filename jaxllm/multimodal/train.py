"""`python -m jaxllm.multimodal.train --config=PATH [--workdir=DIR] [section.key=value ...]`

config -> mesh -> data (synthetic task or JSONL datasets, tokenizer, template, blending) -> VisualChat
model (ViT + projection + jaxllm decoder; optional Hugging Face CLIP / decoder weights) -> resume or
init -> loop of jitted steps with metrics, evaluation and async checkpoints -> held-out answer
accuracy. Rerunning the same command resumes from the newest checkpoint in `WORKDIR/checkpoints/`
(the state, the Grain iterator position and the run's settings are saved together).

The workdir holds `metrics.jsonl` (rows with `step`, `loss`, `lr`, `grad_norm`, `tokens_per_sec`,
`mfu`, `skipped_steps`; evaluation rows add `eval_loss`, and the last one `eval_accuracy`,
`eval_accuracy/<category>` and `eval_accuracy/<group>` such as `pair_more`), `tensorboard/`,
`checkpoints/`, `data/` (tokenizer, synthetic data) and
`eval_answers.jsonl` (every held-out question with the generated and reference answers).

Only the parameter groups of `multimodal.train_*` receive gradients and optimizer state (by default
the projection and the text-embedding copy, as DeepSpeed-VisualChat trains); the others are carried
in the checkpoint unchanged under `frozen`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxllm
from jaxllm import mesh as mesh_lib
from jaxllm.checkpoint import Checkpointer, fault_point
from jaxllm.config import ModelConfig
from jaxllm.data.pipeline import make_train_iterator, stack_rows
from jaxllm.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, TextTokenizer, load_tokenizer, train_tokenizer
from jaxllm.errors import UserError
from jaxllm.metrics import MetricsWriter, flops_per_token, peak_flops, truncate_after
from jaxllm.multimodal import data as data_lib
from jaxllm.multimodal import synthetic
from jaxllm.multimodal.chat import answer_questions, make_generator
from jaxllm.multimodal.config import DatasetConfig, VisionConfig, VisualChatConfig, load
from jaxllm.multimodal.model import init_params, model_def, split_params
from jaxllm.optim import build_optimizer
from jaxllm.state import ModelDef, _opt_state_shardings

MODEL_KEYS = ("inputs", "targets", "token_types", "positions", "loss_mask", "images")


# ---------------------------------------------------------------------------------------------------
# Data and tokenizer


@dataclasses.dataclass
class Data:
    datasets: dict[str, list[data_lib.Conversation]]
    specs: dict[str, DatasetConfig]
    held_out: list[data_lib.Conversation]


def load_data(config: VisualChatConfig, workdir: Path) -> Data:
    """The training datasets and held-out conversations (writing the synthetic task first if asked)."""
    data, max_images = config.data, config.data.max_images
    if data.source == "synthetic":
        directory = workdir / "data" / "synthetic"
        if jax.process_index() == 0:
            synthetic.write_dataset(directory, config.synthetic, config.vision.image_size, config.seed)
        _barrier("synthetic data")
        specs = {"single": DatasetConfig(str(directory / "train_single.jsonl"), 1.0, config.synthetic.single_concat),
                 "pair": DatasetConfig(str(directory / "train_pair.jsonl"), 1.0, 1)}
        specs |= data.datasets  # a named dataset may replace or extend the synthetic ones
        eval_path = data.eval_path or str(directory / "eval.jsonl")
    else:
        specs, eval_path = dict(data.datasets), data.eval_path
    datasets = {name: data_lib.read_conversations(spec.path, spec.image_root, max_images, f"data.datasets.{name}.path")
                for name, spec in specs.items()}
    held_out = data_lib.read_conversations(eval_path, None, max_images, "data.eval_path") if eval_path else []
    if data.verify_images:
        for convs in [*datasets.values(), held_out]:
            data_lib.verify_images(convs)
    return Data(datasets, specs, held_out)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def workdir_tokenizer(workdir: Path) -> Path | None:
    for name in (HF_FILE, SENTENCEPIECE_FILE):
        if (workdir / "data" / name).is_file():
            return workdir / "data" / name
    return None


def setup_tokenizer(config: VisualChatConfig, workdir: Path, conversations: list[data_lib.Conversation]
                    ) -> TextTokenizer:
    """The run's tokenizer, kept in `WORKDIR/data/`: the workdir's own (on resume), `data.tokenizer`,
    the `model.init_from` directory's, or a SentencePiece model of `model.vocab_size` pieces trained on
    the conversations (no dummy prefix, so separately encoded template pieces join exactly)."""
    existing = workdir_tokenizer(workdir)
    if existing is not None:
        return load_tokenizer(existing)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    source = config.data.tokenizer or (config.model.init_from if config.model.init_from else None)
    if jax.process_index() == 0:
        if source is not None:
            path = Path(load_tokenizer(source).path)
            shutil.copyfile(path, workdir / "data" / (HF_FILE if path.suffix == ".json" else SENTENCEPIECE_FILE))
        else:
            corpus = data_lib.Template.corpus(conversations, config.data.system_prompt)
            try:
                train_tokenizer(corpus, workdir / "data" / "tokenizer", config.model.vocab_size,
                                add_dummy_prefix=False)
            except UserError as err:
                raise UserError(f"config key 'model.vocab_size': {err}") from None
    _barrier("tokenizer")
    return load_tokenizer(workdir_tokenizer(workdir))


def resolve_models(config: VisualChatConfig) -> tuple[ModelConfig, VisionConfig]:
    """The decoder and vision settings, with Hugging Face config.json files filling in `init_from` runs."""
    model, vision = config.model, config.vision
    if model.init_from:
        from jaxllm.interop import hf

        model = hf.resolve_model_config(model, model.init_from)
    if vision.init_from:
        from jaxllm.multimodal.vit import vision_config_from_hf

        vision = vision_config_from_hf(vision.init_from, vision)
    if config.data.max_seq_len > model.max_len:
        raise UserError(f"config key 'data.max_seq_len': got {config.data.max_seq_len}; expected at most the "
                        f"model's max_len={model.max_len}")
    return model, vision


# ---------------------------------------------------------------------------------------------------
# State, steps


@dataclasses.dataclass(frozen=True)
class _Axes:
    logical_axes: Any  # what `_opt_state_shardings` reads of a model definition


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


@dataclasses.dataclass(frozen=True)
class Layout:
    state: Any
    abstract: Any
    groups: dict[str, tuple[str, ...]]  # {"params": trainable groups, "frozen": the rest (if any)}


def state_layout(mesh: Mesh, mdef: ModelDef, tx: optax.GradientTransformation, trainable: tuple[str, ...],
                 zero_stage: int) -> Layout:
    """Shardings and abstract shapes of `{"step", "skipped_steps", "params", "frozen"?, "opt_state"}`."""
    params = {k: v for k, v in mdef.shapes.items() if k in trainable}
    frozen = {k: v for k, v in mdef.shapes.items() if k not in trainable}
    abstract_of = lambda shapes: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,  # noqa: E731
                                              is_leaf=_is_shape)
    shard = lambda shapes, drop: mesh_lib.tree_shardings(  # noqa: E731
        mesh, {k: mdef.logical_axes[k] for k in shapes}, shapes, drop)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, abstract_of(params))
    shardings = {"step": replicated, "skipped_steps": replicated,
                 "params": shard(params, mesh_lib.param_drop(zero_stage)),
                 "opt_state": _opt_state_shardings(mesh, _Axes({k: mdef.logical_axes[k] for k in params}),
                                                   opt_abstract, mesh_lib.opt_drop(zero_stage))}
    tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "skipped_steps": jax.ShapeDtypeStruct((), jnp.int32),
            "params": abstract_of(params), "opt_state": opt_abstract}
    groups = {"params": tuple(params)}
    if frozen:
        shardings["frozen"] = shard(frozen, mesh_lib.param_drop(zero_stage))
        tree["frozen"] = abstract_of(frozen)
        groups["frozen"] = tuple(frozen)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    return Layout(shardings, abstract, groups)


def all_params(state: dict) -> dict:
    return {**state["params"], **state.get("frozen", {})}


def initial_state(config: VisualChatConfig, model: ModelConfig, vision: VisionConfig, tx, layout: Layout,
                  mdef: ModelDef) -> dict:
    """Step-0 state: fresh parameters, then Hugging Face weights for the vision tower and/or decoder."""
    shardings = {**layout.state["params"], **layout.state.get("frozen", {})}
    params = jax.jit(lambda: init_params(model, vision, config.multimodal, config.seed), out_shardings=shardings)()
    if vision.init_from:
        from jaxllm.multimodal.vit import load_clip_vision

        _, loaded = load_clip_vision(vision.init_from, vision)
        params["vision"] = jax.tree.map(lambda x, s: jax.device_put(x, s), loaded, shardings["vision"])
    if model.init_from:
        from jaxllm.interop import hf

        params["decoder"] = hf.load_params(model.init_from, model, shardings["decoder"])
        params["text_embed"] = jax.jit(lambda e: e + 0, out_shardings=shardings["text_embed"])(
            params["decoder"]["embed"])
    trainable, frozen = split_params(params, layout.groups["params"])

    def init(trainable, frozen):
        zero = jnp.zeros((), jnp.int32)
        state = {"step": zero, "skipped_steps": zero, "params": trainable, "opt_state": tx.init(trainable)}
        return state | ({"frozen": frozen} if frozen else {})

    return jax.jit(init, out_shardings=layout.state)(trainable, frozen)


def loss_sums(mdef: ModelDef, params: dict, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Summed answer-token cross-entropy (f32) and the number of answer tokens."""
    model = mdef.bind(params)
    logits = model(batch["inputs"], batch["token_types"], batch["images"], batch["positions"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def make_train_step(mdef: ModelDef, tx, schedule, layout: Layout, grad_accum: int = 1):
    """The jitted `step(state, batch) -> (state, metrics)`: mean answer-token loss over the global batch
    (accumulated over `grad_accum` micro-batches), gradients for the trainable groups only, and a step
    with a non-finite loss or gradient norm skipped (state unchanged, `skipped_steps` + 1)."""

    def step(state, batch):
        params, frozen = state["params"], state.get("frozen", {})
        grad_fn = jax.value_and_grad(lambda p, b: loss_sums(mdef, {**p, **frozen}, b), has_aux=True)

        def accumulate(carry, micro):
            grad_sum, loss_sum, count = carry
            (loss, n), grads = grad_fn(params, micro)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, count + n), None

        init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        if grad_accum == 1:
            (grad_sum, loss_sum, count), _ = accumulate(init, batch)
        else:
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum,
                                                                   *x.shape[1:]), 0, 1), batch)
            (grad_sum, loss_sum, count), _ = jax.lax.scan(accumulate, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = dict(state, step=state["step"] + 1,
                         skipped_steps=state["skipped_steps"] + (~finite).astype(jnp.int32),
                         params=keep(new_params, params), opt_state=keep(new_opt, state["opt_state"]))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "answer_tokens": count}
        return new_state, metrics

    return jax.jit(step, in_shardings=(layout.state, None), out_shardings=(layout.state, None), donate_argnums=0)


def make_eval_step(mdef: ModelDef):
    return jax.jit(lambda params, batch: loss_sums(mdef, params, batch))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, mesh_lib.logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, rows: int) -> dict[str, jax.Array]:
    """This process's rows of a host batch as global arrays split over the data axes (model keys only)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, batch[k].ndim), batch[k],
                                                      (rows, *batch[k].shape[1:])) for k in MODEL_KEYS}


def eval_batches(rows: data_lib.HeldOutRows, batch_size: int, limit: int, pidx: int, pcount: int) -> list[dict]:
    """Held-out rows in fixed-size batches; the last is filled with copies of row 0 whose loss mask is 0."""
    count = -(-len(rows) // batch_size)
    count = min(count, limit) if limit else count
    batches = []
    for k in range(count):
        indices = range(k * batch_size + pidx, (k + 1) * batch_size, pcount)
        batch = stack_rows([rows[i if i < len(rows) else 0] for i in indices])
        batch["loss_mask"] *= np.asarray([i < len(rows) for i in indices], np.float32)[:, None]
        batches.append(batch)
    return batches


def step_flops(model: ModelConfig, vision: VisionConfig, seq_len: int, images: int) -> float:
    """Model FLOPs of one training row, jaxllm's convention (every parameter counted as trained):
    the decoder's `flops_per_token` over `seq_len` tokens plus the ViT's 6 x params + attention over its
    `images` image slots."""
    d, f, n = vision.d_model, vision.d_ff, vision.grid**2 + 1
    vit_params = vision.layers * (4 * d * d + 2 * d * f) + vision.channels * vision.patch_size**2 * d
    vit = (6 * vit_params + 12 * vision.layers * n * d) * n * images
    return flops_per_token(model, seq_len) * seq_len + vit


# ---------------------------------------------------------------------------------------------------
# The run


def run_meta(config: VisualChatConfig, model: ModelConfig, vision: VisionConfig, tokenizer: TextTokenizer,
             layout: Layout) -> dict[str, Any]:
    model_meta = dataclasses.asdict(model) | {"kv_heads": model.num_kv_heads, "d_ff": model.ffn_dim,
                                              "tie_embeddings": model.tied}
    return {"model": model_meta, "jaxllm_version": jaxllm.__version__,
            "visualchat": {"vision": dataclasses.asdict(vision), "multimodal": dataclasses.asdict(config.multimodal),
                           "max_images": config.data.max_images, "max_seq_len": config.data.max_seq_len,
                           "system_prompt": config.data.system_prompt, "tokenizer_file": Path(tokenizer.path).name,
                           "state_groups": {k: list(v) for k, v in layout.groups.items()}}}


VISION_SHAPE_KEYS = ("image_size", "patch_size", "channels", "d_model", "layers", "heads", "d_ff", "keep_class_token")


def check_resume(ckpt: Checkpointer, step: int, meta: dict[str, Any]) -> None:
    ckpt.check_compatible(step, meta["model"])
    saved = ckpt.read_meta(step).get("visualchat")
    if not isinstance(saved, dict):
        raise UserError(f"workdir checkpoint '{ckpt.directory / str(step)}' is not a VisualChat checkpoint; use "
                        "another --workdir")
    mine = meta["visualchat"]
    diffs = [f"vision.{k}: checkpoint {saved['vision'].get(k)!r}, config {mine['vision'][k]!r}"
             for k in VISION_SHAPE_KEYS if saved["vision"].get(k) != mine["vision"][k]]
    if saved.get("state_groups") != mine["state_groups"]:
        diffs.append(f"trained groups: checkpoint {saved.get('state_groups')}, config {mine['state_groups']} "
                     "(multimodal.train_*)")
    if diffs:
        raise UserError(f"workdir checkpoint '{ckpt.directory / str(step)}' holds a different model "
                        f"({'; '.join(diffs)}); use another --workdir or the checkpoint's settings")


def evaluate_accuracy(config: VisualChatConfig, mdef: ModelDef, params: dict, template: data_lib.Template,
                      parts: list[data_lib.EncodedConversation], model: ModelConfig, vision: VisionConfig,
                      tokenizer: TextTokenizer, workdir: Path | None) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to each held-out conversation's last question, per category."""
    questions = data_lib.last_questions(parts, template)
    generator = make_generator(mdef, max_new_tokens=config.eval.max_new_tokens, stop_tokens=(tokenizer.eos_id,),
                               pad_id=template.pad_id)
    answers = answer_questions(generator, params, [q.sample for q in questions], tokenizer, vision,
                               config.data.max_images, model.max_len, config.eval.max_new_tokens,
                               batch_size=max(config.train.batch_size, 8))
    hits: dict[str, list[bool]] = {}
    records = []
    for q, a in zip(questions, answers, strict=True):
        ok = a == q.answer.strip()
        hits.setdefault(q.category, []).append(ok)
        records.append({"source": q.source, "category": q.category, "answer": a, "reference": q.answer, "correct": ok})
    if workdir is not None and jax.process_index() == 0:
        (workdir / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = {"eval_accuracy": float(np.mean([r["correct"] for r in records]))}
    out |= {f"eval_accuracy/{c}": float(np.mean(h)) for c, h in sorted(hits.items())}
    groups: dict[str, list[bool]] = {}  # "single_count/colour" also counts towards "single_count"
    for c, h in hits.items():
        if "/" in c:
            groups.setdefault(c.split("/")[0], []).extend(h)
    out |= {f"eval_accuracy/{g}": float(np.mean(h)) for g, h in sorted(groups.items())}
    return out


def train(config: VisualChatConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics row (with the final evaluation)."""
    from jaxllm.train import init_distributed, setup_compile_cache

    init_distributed(config)
    setup_compile_cache(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    train_cfg = config.train
    micro = train_cfg.batch_size // train_cfg.grad_accum
    shards = mesh_lib.data_parallel_size(mesh)
    if micro % shards or train_cfg.batch_size % jax.process_count():
        raise UserError(f"config key 'train.batch_size': {train_cfg.batch_size} / train.grad_accum "
                        f"{train_cfg.grad_accum} = {micro} rows per micro-batch do not divide over the {shards} data "
                        f"shards (mesh.data x mesh.fsdp) and {jax.process_count()} processes")
    workdir.mkdir(parents=True, exist_ok=True)
    model, vision = resolve_models(config)
    data = load_data(config, workdir)
    every = [c for convs in data.datasets.values() for c in convs]
    tokenizer = setup_tokenizer(config, workdir, every)
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but model.vocab_size="
                        f"{model.vocab_size}")
    template = data_lib.Template(tokenizer, vision.tokens, config.data.system_prompt)
    seq_len = config.data.max_seq_len
    encoded = {name: data_lib.encode_conversations(convs, template, seq_len) for name, convs in data.datasets.items()}
    held_out = data_lib.encode_conversations(data.held_out, template, seq_len)
    names = list(encoded)
    rows = data_lib.VisualChatRows([encoded[n] for n in names], [data.specs[n].ratio for n in names],
                                   [data.specs[n].concat for n in names], template, vision, seq_len,
                                   config.data.max_images, config.seed, config.data.samples_per_epoch)
    if len(rows) < train_cfg.batch_size:
        raise UserError(f"config key 'train.batch_size': {train_cfg.batch_size} exceeds the {len(rows)} training "
                        "samples")
    dropped = sum(p.dropped_turns for parts in encoded.values() for p in parts)
    if dropped and jax.process_index() == 0:
        print(f"note: {dropped} turn(s) beyond data.max_seq_len={seq_len} were dropped (whole turns, with their "
              "images)", file=sys.stderr)

    mdef = model_def(model, vision, config.multimodal)
    tx, schedule = build_optimizer(config)  # adamw with clipping on warm-up + cosine (validated)
    with jax.set_mesh(mesh):
        layout = state_layout(mesh, mdef, tx, config.multimodal.trainable(), config.mesh.zero_stage)
    pidx, pcount = jax.process_index(), jax.process_count()
    iterator = make_train_iterator(rows, train_cfg.batch_size, config.seed, pidx, pcount)
    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    meta = run_meta(config, model, vision, tokenizer, layout)
    start = ckpt.latest_step()
    try:
        with jax.set_mesh(mesh):
            if start is not None:
                check_resume(ckpt, start, meta)
                state = ckpt.restore(start, layout.abstract, iterator)
            else:
                start = 0
                state = initial_state(config, model, vision, tx, layout, mdef)
    except BaseException:
        ckpt.close()
        raise
    train_step = make_train_step(mdef, tx, schedule, layout, train_cfg.grad_accum)
    eval_step = make_eval_step(mdef)
    held_rows = data_lib.HeldOutRows(held_out, template, vision, seq_len, config.data.max_images)
    batches = eval_batches(held_rows, train_cfg.batch_size, config.eval.batches, pidx, pcount) if held_out else []

    def evaluate(state) -> dict[str, float]:
        total, count = 0.0, 0.0
        for batch in batches:
            s, n = eval_step(all_params(state), to_global(batch, mesh, train_cfg.batch_size))
            total, count = total + float(s), count + float(n)
        return {"eval_loss": total / max(count, 1.0)} if batches else {}

    lead = pidx == 0
    total_steps = train_cfg.steps
    if config.eval.accuracy and pcount > 1 and lead:
        print("note: eval.accuracy (generation) runs in single-process runs only; skipped", file=sys.stderr)
    if lead:
        truncate_after(workdir / "metrics.jsonl", start)
    writer = MetricsWriter(workdir, total_steps, start, config.log.tensorboard, config.log.progress_bar) if lead \
        else None
    peak, _ = peak_flops(model.compute_dtype)
    flops = step_flops(model, vision, seq_len, config.data.max_images) * train_cfg.batch_size
    last: dict[str, Any] = {}
    timer, timed, tokens, step = time.perf_counter(), 0, 0, start
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                host = next(iterator)
                tokens += int(np.count_nonzero(host["token_types"])) * pcount
                state, metrics = train_step(state, to_global(host, mesh, train_cfg.batch_size))
                step += 1
                timed += 1
                fault_point("kill_after_step", step)
                if writer:
                    writer.advance()
                row: dict[str, Any] = {}
                if step % train_cfg.log_every == 0 or step in (start + 1, total_steps):
                    values = jax.device_get(metrics)
                    elapsed = time.perf_counter() - timer
                    row = {"step": step, "loss": float(values["loss"]), "lr": float(values["lr"]),
                           "grad_norm": float(values["grad_norm"]), "tokens_per_sec": tokens / elapsed,
                           "mfu": flops * timed / elapsed / peak,
                           "skipped_steps": int(jax.device_get(state["skipped_steps"]))}
                if (config.eval.every and step % config.eval.every == 0) or step == total_steps:
                    row = {"step": step, **row, **evaluate(state)}
                if step == total_steps and config.eval.accuracy and held_out and pcount == 1:
                    row |= evaluate_accuracy(config, mdef, all_params(state), template, held_out, model, vision,
                                             tokenizer, workdir)
                if row:
                    last = row
                    if writer:
                        writer.write(row)
                    timer, timed, tokens = time.perf_counter(), 0, 0
                if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == total_steps:
                    ckpt.save(step, state, iterator, meta)
    finally:
        ckpt.close()
        if writer:
            writer.close()
    return last


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.multimodal.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (defaults apply without one)")
    parser.add_argument("--workdir", default="runs/visualchat", help="metrics, checkpoints and data go here")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected section.key=value overrides, got {bad[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load(args.config, args.overrides)
        train(config, Path(args.workdir))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
