"""`python -m jaxllm.train --config=PATH [--workdir=DIR] [--dry-run [--json FILE]] [section.key=value ...]`

The pretraining task on the training engine: its loss is next-token cross-entropy
(`jaxllm.losses.lm_loss_sums`), its data the token shards of `data:` (with curriculum learning and
random-LTD from `curriculum:` / `random_ltd:`), its evaluation the held-out rows' loss and perplexity.
Everything else (runtime, state layout, optimizer, step, loop, checkpoints) is `jaxllm.engine`'s.
Rerunning the same command resumes from the newest complete checkpoint in `WORKDIR/checkpoints/`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import memory, pipeline_plan, runtime
from jaxllm import mesh as mesh_lib
from jaxllm.command_line import parse_run_args, run_parser
from jaxllm.config import Config
from jaxllm.data.pipeline import make_eval_batches, make_train_iterator
from jaxllm.data.shards import fingerprint, verify_shards
from jaxllm.data.sources import build_sources, token_directory
from jaxllm.data_efficiency import DataEfficiency
from jaxllm.engine import loop
from jaxllm.engine.background_compile import BackgroundCompiledStep
from jaxllm.engine.checkpoint import Checkpointer, saved_steps
from jaxllm.engine.step import evaluate
from jaxllm.errors import UserError, exit_status
from jaxllm.ltd import LTDSetup
from jaxllm.metrics import flops_per_token, peak_flops
from jaxllm.models.decoder import count_params
from jaxllm.pretraining import LanguageModelTraining


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = run_parser("python -m jaxllm.train", __doc__.splitlines()[0], "runs/default")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build the mesh and abstract model, print sizes and memory, then exit")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the workdir's latest checkpoint on the config's held-out rows, print the "
                             "eval loss as JSON, then exit (nothing is trained or written)")
    parser.add_argument("--json", metavar="FILE", help="with --dry-run: also write its figures to this file")
    args = parse_run_args(parser, argv)
    if args.json and not args.dry_run:
        parser.error("--json applies to --dry-run")
    return args


def dry_run(config: Config, mesh, task: LanguageModelTraining, json_path: Path | None = None) -> dict[str, Any]:
    """Sizes, the stage split and bubble of a pipelined run (`jaxllm.pipeline_plan`), the per-device
    memory estimate by term with its device and host totals (`jaxllm.memory`), and on a TPU or GPU the
    compiler's own figure for the step on these devices; the same figures go to `json_path` as JSON."""
    counts = count_params(config.model)
    layout = task.layout
    shape = dict(mesh.shape)
    plan = pipeline_plan.stage_plan(config, shape)
    est = memory.estimate(config, layout, shape)
    print(f"mesh: {shape} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices")
    print(f"parameters: {counts['total']:,} ({counts['non_embedding']:,} non-embedding)")
    if plan:
        print("\n".join(pipeline_plan.describe(plan)))
    print("\n".join(memory.describe(est, layout)))
    capacity, what = memory.device_memory(mesh.devices.flat[0])
    compiled = None
    if jax.default_backend() in ("tpu", "gpu"):  # a CPU compile's figures say nothing about an accelerator
        from jaxllm.aot import abstract_batch

        with jax.set_mesh(mesh):
            step = task.train_step()
            if hasattr(step, "lower"):  # a 1-bit optimizer runs one program per phase: estimate only
                batch = abstract_batch(config, mesh, config.train.batch_size, config.data.seq_len)
                compiled = memory.compiled_total(step.lower(layout.abstract, batch).compile().memory_analysis())
    print(memory.verdict(est["total"], capacity, what, compiled))
    flops = flops_per_token(config.model, config.data.seq_len)
    print(f"model FLOPs per token (training): {flops:.4g}")
    report = {"mesh": shape, "parameters": counts["total"], "pipeline": plan,
              "memory": {"terms": {k: v for k, v in est.items() if k not in memory.TOTALS},
                         "host_terms": sorted(memory.host_terms(layout)), "device_total": est["total"],
                         "host_total": est["host_total"], "device_capacity": capacity, "compiled_total": compiled},
              "flops_per_token": flops}
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def train(config: Config, workdir: Path, dry: bool = False, summary: bool = False,
          eval_only: bool = False, dry_json: Path | None = None) -> dict[str, Any]:
    """Runs (or resumes) pretraining; returns the last logged metrics row. With `summary` (the command
    line's), ends with a short sample from the trained model and where everything went. With
    `eval_only`, returns the held-out metrics of the latest checkpoint instead of training. With `dry`,
    prints the dry run's report and returns it (also written to `dry_json`)."""
    if config.model.init_from:
        from jaxllm.interop import hf

        config = hf.resolve_init_from(config)
    mesh = runtime.start(config)
    runtime.check_batch(config, mesh)
    # Curriculum / random-LTD: per-step lengths, the token budget and the LayerToken LR (or None).
    efficiency = DataEfficiency.from_config(config, mesh_lib.data_parallel_size(mesh) * config.train.grad_accum)
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(config, mesh, efficiency.lr_schedule() if efficiency else None)
    if dry:
        return dry_run(config, mesh, task, dry_json)
    with runtime.workdir_lock(workdir):
        return _train(config, workdir, mesh, efficiency, task, summary, eval_only)


def _train(config: Config, workdir: Path, mesh: jax.sharding.Mesh, efficiency: DataEfficiency | None,
           task: LanguageModelTraining, summary: bool = False, eval_only: bool = False) -> dict[str, Any]:
    """The run itself, on a workdir this process holds."""
    if eval_only and not saved_steps(workdir / "checkpoints"):
        raise UserError(f"--eval-only: workdir '{workdir}' has no checkpoint to evaluate")
    started = time.perf_counter()
    shard_dir = runtime.lead_first(lambda: token_directory(config, workdir), "the training data")
    train_rows, eval_rows = build_sources(config, shard_dir)
    if shard_dir is not None:  # after build_sources, which names a missing or malformed directory
        runtime.lead_first(lambda: verify_shards(shard_dir), "the check of the training data")
    batch_size, seq_len = config.train.batch_size, config.data.seq_len
    slot, slots = runtime.data_slot(mesh, (batch_size, seq_len))
    if efficiency and efficiency.uses_sampler():
        iterator = efficiency.make_iterator(train_rows, shard_dir, slot, slots)
    else:
        iterator = make_train_iterator(train_rows, batch_size, config.seed, slot, slots)
    held_out = []
    if (config.eval.every or eval_only) and eval_rows is not None:
        held_out = make_eval_batches(eval_rows, batch_size, config.eval.batches, slot, slots)

    def init() -> dict[str, Any]:
        if config.model.init_from:  # streamed from the Hugging Face files into their shards
            from jaxllm.interop import hf

            return task.init_state(hf.load_params(config.model.init_from, config.model, task.load_shardings()))
        return task.init_state()

    ckpt = Checkpointer.for_run(workdir, config)
    data = fingerprint(shard_dir) if shard_dir is not None else None
    meta = task.meta(data=data)
    total_steps = efficiency.total_steps if efficiency else config.train.steps
    ltd = None
    if efficiency and efficiency.ltd_layers:
        ltd = LTDSetup(efficiency.ltd_layers, config.seed, config.random_ltd.attention_implementation)
    with jax.set_mesh(mesh):
        state, start = ckpt.resume_or_init(task.layout.abstract, iterator, meta, init,
                                           lambda step: _check_same_data(ckpt, step, data, shard_dir))
        # Per-device metrics of a 1-bit optimizer are reduced only on the steps that log them.
        train_step = task.train_step(ltd, summarize=loop.logged_steps(config, start, total_steps))
        eval_step = task.eval_step()
    if efficiency and config.train.background_compile and hasattr(train_step, "lower"):
        signatures = [(efficiency.rows(t), efficiency.seq_len(t), efficiency.kept(t))
                      for t in range(start, total_steps)]
        if len(set(signatures)) > 1:  # later shapes compile while the earlier ones train
            train_step = BackgroundCompiledStep(train_step, signatures, mesh)

    full_step = {"tokens": batch_size * seq_len, "layer_tokens": batch_size * seq_len}
    local_multiple = max(1, mesh_lib.data_parallel_size(mesh) * config.train.grad_accum // slots)

    def step_fn(state, step):
        if efficiency is None:
            state, metrics = train_step(state, runtime.to_global(next(iterator), mesh, batch_size, True))
            return state, metrics, full_step
        batch = efficiency.prepare(next(iterator), step, local_multiple)
        kept = () if ltd is None else (efficiency.kept(step),)
        state, metrics = train_step(state, runtime.to_global(batch, mesh, batch["inputs"].shape[0] * slots, True),
                                    *kept)
        return state, metrics, {"tokens": efficiency.tokens(step), "layer_tokens": efficiency.layer_tokens(step)}

    peak, _ = peak_flops(config.model.compute_dtype)
    flops = flops_per_token(config.model, seq_len)

    def row_fn(step, host, work, seconds, steps):
        row = {"loss": float(host["loss"]), "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
               "tokens_per_sec": work["tokens"] / seconds, "mfu": work["layer_tokens"] / seconds * flops / peak}
        if efficiency:
            row |= {"seq_len": efficiency.seq_len(step - 1), "kept_length": efficiency.kept(step - 1),
                    "consumed_tokens": efficiency.budget.consumed[step] if efficiency.budget else None,
                    "train_step_compilations": _compilations(train_step)}
            row = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in row.items() if v is not None}
        return row

    def evaluate_fn(state, step):
        batches = [runtime.to_global(b, mesh, batch_size, True) for b in held_out]
        loss = evaluate(eval_step, state["params"], batches)["loss"]
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}

    if eval_only:
        if not held_out:
            raise UserError("--eval-only: the config's data has no held-out rows (data.eval_fraction is 0 or the "
                            "data is too small)")
        with jax.set_mesh(mesh):
            metrics = {"step": start, **evaluate_fn(state, start)}
        if runtime.is_lead():
            print(json.dumps(metrics))
        return metrics
    cadence = loop.Cadence.from_config(config, total_steps, eval_at_end=bool(efficiency and efficiency.budget))
    closing = (train_step.close,) if isinstance(train_step, BackgroundCompiledStep) else ()
    with jax.set_mesh(mesh):
        state, last = loop.run(config, workdir, cadence, state, start, step_fn, row_fn,
                               evaluate_fn if held_out else None, ckpt, iterator, meta, closing=closing)
        if summary and runtime.is_lead():
            sample = _sample(task, state["params"], workdir, held_out) if jax.process_count() == 1 else None
            print(run_summary(config, workdir, total_steps - start, time.perf_counter() - started, sample))
    return last


def _sample(task: LanguageModelTraining, params: Any, workdir: Path, held_out: list) -> tuple[str, str] | None:
    """(prompt, completion): 24 tokens the trained model writes after the first 8 of a held-out row."""
    from jaxllm.generate import find_tokenizer, generate

    tokenizer = find_tokenizer(None, str(workdir), None)
    if tokenizer is None or not held_out:
        return None
    prompt = [int(t) for t in np.asarray(held_out[0]["inputs"][0][:8])]
    new = generate(task.model_def.bind(params), [prompt], max_new_tokens=24, temperature=0.8, top_p=0.9,
                   seed=0)[0]
    text = tokenizer.decode(prompt + new)
    start = tokenizer.decode(prompt)
    return start, text[len(start):] if text.startswith(start) else text


def run_summary(config: Config, workdir: Path, steps: int, seconds: float, sample: tuple[str, str] | None) -> str:
    """What a finished run did and where it wrote, with the commands to try next."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def latest(key: str) -> dict[str, Any] | None:
        return next((row for row in reversed(rows) if key in row), None)

    losses = [f"{name} {row[key]:.4f} at step {row['step']}"
              for key, name in (("loss", "train loss"), ("eval_loss", "eval loss")) if (row := latest(key))]
    lines = [f"done: {steps} steps in {seconds:.0f} s; " + ", ".join(losses),
             f"  metrics      {workdir / 'metrics.jsonl'}   (python -m jaxllm.plot {workdir})",
             f"  checkpoints  {workdir / 'checkpoints'}"]
    if config.log.tensorboard:
        lines.append(f"  TensorBoard  {workdir / 'tensorboard'}   (tensorboard --logdir {workdir})")
    if sample:
        lines.append(f"sample: {sample[0]!r} -> {sample[1]!r}")
    lines += ["next:", f"  python -m jaxllm.generate --workdir {workdir} --prompt \"...\"",
              f"  python -m jaxllm.train --config=... --workdir={workdir} train.steps={config.train.steps * 2}"
              "   # goes on from the last checkpoint"]
    return "\n".join(lines)


def _check_same_data(ckpt: Checkpointer, step: int, data: dict[str, str] | None, shard_dir) -> None:
    """Refuses to resume on data or a tokenizer other than the checkpoint's (older checkpoints, which
    recorded none, resume as before)."""
    saved = ckpt.read_meta(step).get("data")
    if not saved or not data or saved == data:
        return
    changed = [what for key, what in (("index_sha256", "its token shards"), ("tokenizer_sha256", "its tokenizer"))
               if saved.get(key) != data.get(key)]
    raise UserError(f"the training data in {shard_dir} changed since checkpoint {step} was written "
                    f"({' and '.join(changed)} differ): resuming would train on other token ids; restore the data, "
                    "or use another --workdir")


def _compilations(jitted) -> int | None:
    """How many programs a step has compiled (one per batch shape / static kept length / phase)."""
    if isinstance(jitted, BackgroundCompiledStep):
        return jitted.compiled
    count = getattr(jitted, "compiled_programs", None)
    return count() if callable(count) else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return exit_status(lambda: train(config_lib.load(args.config, args.overrides), Path(args.workdir),
                                     dry=args.dry_run, summary=True, eval_only=args.eval_only,
                                     dry_json=Path(args.json) if args.json else None))


if __name__ == "__main__":
    sys.exit(main())
