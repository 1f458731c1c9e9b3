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
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxllm import runtime
from jaxllm.command_line import parse_run_args, run_parser
from jaxllm.config import ModelConfig
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.data.pipeline import make_train_iterator, padded_eval_batches
from jaxllm.data.tokenizer import TextTokenizer, load_tokenizer, workdir_tokenizer_file
from jaxllm.engine import loop, optimizer
from jaxllm.engine.checkpoint import Checkpointer
from jaxllm.engine.checkpoint import run_meta as engine_run_meta
from jaxllm.engine.state import StateLayout, all_params, initial_state
from jaxllm.engine.step import evaluate, make_eval_step, make_train_step
from jaxllm.errors import UserError, exit_status
from jaxllm.generate import Sampling
from jaxllm.ltd import LTDPlan
from jaxllm.metrics import flops_per_token, peak_flops
from jaxllm.models.definition import ModelDef
from jaxllm.multimodal import data as data_lib
from jaxllm.multimodal import synthetic
from jaxllm.multimodal.answer import answer_questions, make_generator
from jaxllm.multimodal.config import DatasetConfig, VisionConfig, VisualChatConfig, load
from jaxllm.multimodal.model import init_params, model_def
from jaxllm.ops.cross_entropy import token_cross_entropy

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
        runtime.barrier("synthetic data")
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


def setup_tokenizer(config: VisualChatConfig, workdir: Path, conversations: list[data_lib.Conversation]
                    ) -> TextTokenizer:
    """The run's tokenizer, kept in `WORKDIR/data/`: the workdir's own (on resume), `data.tokenizer`,
    the `model.init_from` directory's, or a SentencePiece model of `model.vocab_size` pieces trained on
    the conversations (no dummy prefix, so separately encoded template pieces join exactly)."""
    existing = workdir_tokenizer_file(workdir)
    if existing is not None:
        return load_tokenizer(existing)
    named = config.data.tokenizer or config.model.init_from

    def train_new(prefix: Path) -> None:
        corpus = data_lib.Template.corpus(conversations, config.data.system_prompt)
        try:
            tokenizer_lib.train_tokenizer(corpus, prefix, config.model.vocab_size, add_dummy_prefix=False)
        except UserError as err:
            raise UserError(f"config key 'model.vocab_size': {err}") from None

    return tokenizer_lib.install_tokenizer(workdir, Path(load_tokenizer(named).path) if named else None, train_new)


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


def frozen_groups(config: VisualChatConfig, mdef: ModelDef) -> tuple[str, ...]:
    """The parameter groups that do not train (`multimodal.train_*` false): kept under `frozen`."""
    trainable = config.multimodal.trainable()
    return tuple(k for k in mdef.shapes if k not in trainable)


def initial_params(config: VisualChatConfig, model: ModelConfig, vision: VisionConfig, layout: StateLayout) -> dict:
    """Step-0 parameters: fresh, then Hugging Face weights for the vision tower and/or decoder."""
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
    return params


def loss_sums(mdef: ModelDef, params: dict, batch: dict[str, jax.Array], ltd: LTDPlan | None = None
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """VisualChat's `LossFn`: summed answer-token cross-entropy (f32), the number of answer tokens, no aux
    metrics. Rows with `weight` 0 fill up a held-out batch. (VisualChat drops no tokens: `ltd` is None.)"""
    model = mdef.bind(params)
    logits = model(batch["inputs"], batch["token_types"], batch["images"], batch["positions"])
    mask = batch["loss_mask"].astype(jnp.float32)
    if "weight" in batch:
        mask = mask * batch["weight"][:, None]
    return jnp.sum(token_cross_entropy(logits, batch["targets"]) * mask), jnp.sum(mask), {}


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, rows: int) -> dict[str, jax.Array]:
    """This process's rows of a host batch as global arrays split over the data axes (model keys only)."""
    return runtime.to_global({k: batch[k] for k in (*MODEL_KEYS, "weight") if k in batch}, mesh, rows)


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
             layout: StateLayout, optimizer_state: dict[str, Any] | None) -> dict[str, Any]:
    groups = {"params": list(layout.state["params"])} | ({"frozen": list(layout.frozen)} if layout.frozen else {})
    return engine_run_meta(model, optimizer_state, visualchat={
        "vision": dataclasses.asdict(vision), "multimodal": dataclasses.asdict(config.multimodal),
        "max_images": config.data.max_images, "max_seq_len": config.data.max_seq_len,
        "system_prompt": config.data.system_prompt, "tokenizer_file": Path(tokenizer.path).name,
        "state_groups": groups})


VISION_SHAPE_KEYS = ("image_size", "patch_size", "channels", "d_model", "layers", "heads", "d_ff", "keep_class_token")


def check_resume(ckpt: Checkpointer, step: int, meta: dict[str, Any]) -> None:
    """Refuses a checkpoint of another vision tower or other trained groups (the engine checks the decoder)."""
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
    generator = make_generator(mdef, Sampling.of(config.eval.max_new_tokens, stop_tokens=(tokenizer.eos_id,),
                                                 pad_id=template.pad_id))
    answers = answer_questions(generator, params, [q.sample for q in questions], tokenizer, vision,
                               config.data.max_images, model.max_len, config.eval.max_new_tokens,
                               batch_size=max(config.train.batch_size, 8))
    hits: dict[str, list[bool]] = {}
    groups: dict[str, list[bool]] = {}  # "single_count/colour" also counts towards "single_count"
    records = []
    for q, a in zip(questions, answers, strict=True):
        ok = a == q.answer.strip()
        hits.setdefault(q.category, []).append(ok)
        if "/" in q.category:
            groups.setdefault(q.category.split("/")[0], []).append(ok)
        records.append({"source": q.source, "category": q.category, "answer": a, "reference": q.answer, "correct": ok})
    if workdir is not None and jax.process_index() == 0:
        (workdir / "eval_answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = {"eval_accuracy": float(np.mean([r["correct"] for r in records]))}
    return out | {f"eval_accuracy/{c}": float(np.mean(h)) for c, h in [*sorted(hits.items()), *sorted(groups.items())]}


def train(config: VisualChatConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics row (with the final evaluation)."""
    mesh = runtime.start(config)
    runtime.check_rows_divide(config.train.batch_size, mesh, "train.batch_size", config.train.grad_accum)
    with runtime.workdir_lock(workdir):
        return _train(config, workdir, mesh)


def _train(config: VisualChatConfig, workdir: Path, mesh: Mesh) -> dict[str, Any]:
    """The run itself, on a workdir this process holds."""
    train_cfg = config.train
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
    frozen = frozen_groups(config, mdef)
    with jax.set_mesh(mesh):
        opt = optimizer.build(config, mesh, mdef, frozen, reads_params="VisualChat's evaluation")
        layout = opt.layout(mesh, mdef, config.mesh.zero_stage, frozen)
    slot, slots = runtime.data_slot(mesh, (train_cfg.batch_size, seq_len))
    iterator = make_train_iterator(rows, train_cfg.batch_size, config.seed, slot, slots)
    ckpt = Checkpointer.for_run(workdir, config)
    meta = run_meta(config, model, vision, tokenizer, layout, opt.signature())
    loss = functools.partial(loss_sums, mdef)
    with jax.set_mesh(mesh):
        state, start = ckpt.resume_or_init(
            layout.abstract, iterator, meta, lambda: initial_state(layout, opt.tx, initial_params(
                config, model, vision, layout)), check=lambda step: check_resume(ckpt, step, meta))
        logged = loop.logged_steps(config, start)
        train_step = make_train_step(loss, opt, layout, train_cfg.grad_accum, summarize=logged)
        eval_step = make_eval_step(loss)
    held_rows = data_lib.HeldOutRows(held_out, template, vision, seq_len, config.data.max_images)
    batches = padded_eval_batches(held_rows, train_cfg.batch_size, config.eval.batches, slot, slots) \
        if held_out else []
    pcount = jax.process_count()
    if config.eval.accuracy and pcount > 1 and runtime.is_lead():
        print("note: eval.accuracy (generation) runs in single-process runs only; skipped", file=sys.stderr)
    peak, _ = peak_flops(model.compute_dtype)
    flops = step_flops(model, vision, seq_len, config.data.max_images) * train_cfg.batch_size

    def step_fn(state, step):
        host = next(iterator)
        state, metrics = train_step(state, to_global(host, mesh, train_cfg.batch_size))
        return state, metrics, {"tokens": int(np.count_nonzero(host["token_types"])) * pcount}

    def row_fn(step, host, work, seconds, steps):
        return {"loss": float(host["loss"]), "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
                "tokens_per_sec": work["tokens"] / seconds, "mfu": flops * steps / seconds / peak}

    def evaluate_fn(state, step):
        out = evaluate(eval_step, all_params(state), [to_global(b, mesh, train_cfg.batch_size) for b in batches])
        row = {"eval_loss": out["loss"]} if out else {}
        if step == train_cfg.steps and config.eval.accuracy and held_out and pcount == 1:
            row |= evaluate_accuracy(config, mdef, all_params(state), template, held_out, model, vision, tokenizer,
                                     workdir)
        return row

    with jax.set_mesh(mesh):
        _, last = loop.run(config, workdir, loop.Cadence.from_config(config), state, start, step_fn, row_fn,
                           evaluate_fn, ckpt, iterator, meta)
    return last


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = run_parser("python -m jaxllm.multimodal.train", __doc__.splitlines()[0], "runs/visualchat",
                        "metrics, checkpoints and data go here")
    return parse_run_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return exit_status(lambda: train(load(args.config, args.overrides), Path(args.workdir)))


if __name__ == "__main__":
    sys.exit(main())
