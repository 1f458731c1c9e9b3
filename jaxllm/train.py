"""`python -m jaxllm.train --config=PATH [--workdir=DIR] [--dry-run] [section.key=value ...]`

config -> (multi-host init) -> mesh -> model and optimizer layout -> data -> resume or init ->
loop of jitted steps with metrics, evaluation and async checkpoints. Rerunning the same command
resumes from the newest complete checkpoint in `WORKDIR/checkpoints/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxllm
from jaxllm import config as config_lib
from jaxllm import memory
from jaxllm import mesh as mesh_lib
from jaxllm.checkpoint import Checkpointer, fault_point
from jaxllm.config import Config
from jaxllm.data.pipeline import make_eval_batches, make_train_iterator
from jaxllm.data.sources import build_sources, token_directory
from jaxllm.data_efficiency import DataEfficiency
from jaxllm.errors import UserError
from jaxllm.ltd import LTDSetup
from jaxllm.metrics import MetricsWriter, flops_per_token, peak_flops, truncate_after
from jaxllm.models.decoder import count_params
from jaxllm.optim import build_optimizer
from jaxllm.state import ModelDef, create_state, state_layout
from jaxllm.step import make_eval_step, make_train_step
from jaxllm.step_compressed import CompressedTraining, check_optimizer_state, is_compressed
from jaxllm.step_programs import StepPrograms


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (defaults apply without one)")
    parser.add_argument("--workdir", default="runs/default", help="metrics, TensorBoard and checkpoints go here")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build the mesh and abstract model, print sizes and memory, then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected section.key=value overrides, got {bad[0]!r}")
    return args, args.overrides


DIST_ENV = ("JAXLLM_COORDINATOR", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID")


def _dist_from_env() -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the JAXLLM_* variables, or None if none is set."""
    found = {name: os.environ[name] for name in DIST_ENV if os.environ.get(name)}
    if not found:
        return None
    missing = [name for name in DIST_ENV if name not in found]
    if missing:
        raise UserError(f"environment variable '{missing[0]}': required when {', '.join(found)} is set")
    try:
        num_processes, process_id = int(found["JAXLLM_NUM_PROCESSES"]), int(found["JAXLLM_PROCESS_ID"])
    except ValueError:
        raise UserError(f"environment variables {DIST_ENV[1]}/{DIST_ENV[2]}: expected integers, got "
                        f"{found['JAXLLM_NUM_PROCESSES']!r}/{found['JAXLLM_PROCESS_ID']!r}") from None
    if not 0 <= process_id < num_processes:
        raise UserError(f"environment variable 'JAXLLM_PROCESS_ID': got {process_id}; expected an integer "
                        f"in [0, JAXLLM_NUM_PROCESSES={num_processes})")
    return found["JAXLLM_COORDINATOR"], num_processes, process_id


def init_distributed(config: Config) -> None:
    """Starts JAX's multi-controller runtime when the config or the environment asks for it.

    In order of precedence: `distributed.auto=true` lets JAX discover the cluster itself (Cloud TPU,
    SLURM, Open MPI); `distributed.coordinator` with `num_processes` and `process_id`; the variables
    JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES and JAXLLM_PROCESS_ID (all three); else one process.
    """
    dist = config.distributed
    coordinator, num_processes, process_id = dist.coordinator, dist.num_processes, dist.process_id
    if not dist.auto and not coordinator and (env := _dist_from_env()):
        coordinator, num_processes, process_id = env
    if dist.auto:
        try:
            jax.distributed.initialize()
        except ValueError as err:  # JAX found no cluster environment to read the coordinator from
            raise UserError(f"config key 'distributed.auto': jax.distributed.initialize() failed: {err}") from None
    elif coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif dist.num_processes > 1:
        raise UserError("config key 'distributed.coordinator': required (HOST:PORT) when "
                        f"distributed.num_processes={dist.num_processes} (or set {', '.join(DIST_ENV)}, "
                        "or distributed.auto=true)")


def compile_cache_dir(config: Config) -> str | None:
    """Where XLA's persistent compilation cache lives for this run, or None when it is off.

    `train.compile_cache` left at its default defers to $JAX_COMPILATION_CACHE_DIR when that is set
    (tests and shared clusters redirect the cache with it); null or "" turns the cache off.
    """
    path = config.train.compile_cache
    if path == config_lib.DEFAULT_COMPILE_CACHE and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    return str(Path(path).expanduser()) if path else None


def setup_compile_cache(config: Config) -> str | None:
    """Points the persistent compilation cache at `compile_cache_dir(config)`; returns that directory.

    Every program is cached, however small or quick to compile: a start compiles several small ones
    (initialisation, the peak-FLOPs matmul, dtype conversions) besides the train step, and on CPU they
    add up to seconds.
    """
    path = compile_cache_dir(config)
    if path != getattr(jax.config, "jax_compilation_cache_dir", None):
        from jax.experimental.compilation_cache import compilation_cache

        # JAX opens the cache once, on the first compilation; a new location needs a fresh start.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    if path:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def check_batch(config: Config, mesh: jax.sharding.Mesh) -> None:
    micro = config.train.batch_size // config.train.grad_accum
    shards = mesh_lib.data_parallel_size(mesh)
    if micro % shards:
        raise UserError(
            f"config key 'train.batch_size': {config.train.batch_size} / train.grad_accum "
            f"{config.train.grad_accum} = {micro} sequences per micro-batch do not divide over the {shards} "
            f"data shards (mesh.data x mesh.fsdp); use a multiple of {shards * config.train.grad_accum}"
        )
    if config.train.batch_size % jax.process_count():
        raise UserError(f"config key 'train.batch_size': {config.train.batch_size} does not divide over "
                        f"{jax.process_count()} processes")
    if config.data.seq_len % mesh.shape["sequence"]:
        raise UserError(f"config key 'data.seq_len': {config.data.seq_len} does not divide over "
                        f"mesh.sequence={mesh.shape['sequence']}")
    mesh_lib.check_attention_heads(config.model.heads, dict(mesh.shape))


def model_meta(config: Config) -> dict[str, Any]:
    """The model settings stored with every checkpoint, with defaults resolved to their values."""
    m = config.model
    model = dataclasses.asdict(m) | {"kv_heads": m.num_kv_heads, "d_ff": m.ffn_dim, "tie_embeddings": m.tied}
    return {"model": model, "jaxllm_version": jaxllm.__version__}


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def dry_run(config: Config, mesh, layout) -> None:
    counts = count_params(config.model)
    grads = memory.sharded_bytes(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                              layout.abstract["params"], layout.grads))
    est = memory.estimate(config, layout.abstract, grads, dict(mesh.shape))
    print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices")
    print(f"parameters: {counts['total']:,} ({counts['non_embedding']:,} non-embedding)")
    print("per-device memory estimate: " + ", ".join(f"{k} {_gib(v)}" for k, v in est.items()))
    print(f"model FLOPs per token (training): {flops_per_token(config.model, config.data.seq_len):.4g}")


def data_slot(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """(slot, slots): which of the disjoint row blocks of a global batch of `shape` this process loads.

    Processes whose devices hold the same batch rows (a tensor or sequence axis spanning hosts) share
    a slot and so load identical rows, as `make_array_from_process_local_data` requires of replicas;
    slicing by process index instead would silently feed them different data.
    """
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(shape[0])))
    blocks = sorted({tuple(sorted(r)) for r in rows.values()})
    mine = tuple(sorted(rows[jax.process_index()]))
    if len(blocks) * len(mine) != shape[0] or len(set().union(*blocks)) != shape[0]:
        raise UserError(f"config key 'mesh': the batch axes do not split the {shape[0]} batch rows evenly "
                        "between processes; order the mesh so each host holds whole data/fsdp shards")
    return blocks.index(mine), len(blocks)


def _to_global(batch: dict[str, np.ndarray], sharding, rows: int) -> dict[str, jax.Array]:
    # The global shape is explicit: inferring it would be wrong when processes hold replicated rows.
    return {k: jax.make_array_from_process_local_data(sharding, v, (rows, *v.shape[1:])) for k, v in batch.items()}


def _evaluate(eval_step, params, batches, sharding, rows: int) -> dict[str, float]:
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        s, n = eval_step(params, _to_global(batch, sharding, rows))
        loss_sum, count = loss_sum + float(s), count + float(n)
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}


def resolve_init_from(config: Config) -> Config:
    """With `model.init_from`, the Hugging Face config.json fills the model section.

    Architecture keys left at their defaults take the checkpoint's values; one set to a different
    value is a UserError naming both (see `jaxllm.interop.hf.resolve_model_config`).
    """
    if not config.model.init_from:
        return config
    from jaxllm.interop import hf

    return dataclasses.replace(config, model=hf.resolve_model_config(config.model, config.model.init_from)).validate()


def _state_from_hf(config: Config, tx, layout) -> dict[str, Any]:
    """The step-0 state with parameters streamed from `model.init_from` into their shards."""
    from jaxllm.interop import hf

    params = hf.load_params(config.model.init_from, config.model, layout.state["params"])

    def init(params):
        zero = jax.numpy.zeros((), jax.numpy.int32)
        return {"step": zero, "skipped_steps": zero, "params": params, "opt_state": tx.init(params)}

    return jax.jit(init, out_shardings=layout.state, donate_argnums=0)(params)


def train(config: Config, workdir: Path, dry: bool = False) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics row."""
    config = resolve_init_from(config)
    setup_compile_cache(config)
    init_distributed(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    check_batch(config, mesh)
    model_def = ModelDef.from_config(config.model)
    # Curriculum / random-LTD: per-step lengths, the token budget and the LayerToken LR (or None).
    efficiency = DataEfficiency.from_config(config, mesh_lib.data_parallel_size(mesh) * config.train.grad_accum)
    tx, schedule = build_optimizer(config, efficiency.lr_schedule() if efficiency else None)
    # 1-bit Adam, 0/1 Adam, 1-bit LAMB: per-device gradients and state (jaxllm.step_compressed).
    compressed = CompressedTraining(config, mesh, model_def, schedule) if is_compressed(config) else None
    if compressed:
        tx = compressed.state_tx  # initialises every device's optimizer state
    with jax.set_mesh(mesh):
        layout = compressed.layout if compressed else state_layout(mesh, model_def, tx, config.mesh.zero_stage)
    if dry:
        dry_run(config, mesh, layout)
        return {}

    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    shard_dir, failure = None, None
    if lead:
        try:
            shard_dir = token_directory(config, workdir)
        except Exception as err:  # re-raised below, once the other processes know
            failure = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # A broadcast instead of a bare barrier: if process 0 fails to prepare the data, the others
        # stop at once with a clear error instead of failing later in a collective timeout.
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
        if not ok and not lead:
            raise UserError("process 0 failed to prepare the training data; see its output")
        if not lead:
            shard_dir = token_directory(config, workdir)
    if failure is not None:
        raise failure
    train_rows, eval_rows = build_sources(config, shard_dir)
    batch_size = config.train.batch_size
    sharding = mesh_lib.batch_sharding(mesh)
    slot, slots = data_slot(sharding, (batch_size, config.data.seq_len))
    if efficiency and efficiency.uses_sampler():
        iterator = efficiency.make_iterator(train_rows, shard_dir, slot, slots)
    else:
        iterator = make_train_iterator(train_rows, batch_size, config.seed, slot, slots)
    eval_batches = []
    if config.eval.every and eval_rows is not None:
        eval_batches = make_eval_batches(eval_rows, batch_size, config.eval.batches, slot, slots)

    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    meta = model_meta(config)
    meta["optimizer_state"] = compressed.signature() if compressed else None  # per-device state: mesh-bound
    start = ckpt.latest_step()
    with jax.set_mesh(mesh):
        if start is not None:
            ckpt.check_compatible(start, meta["model"])
            check_optimizer_state(ckpt.read_meta(start).get("optimizer_state"), meta["optimizer_state"],
                                  ckpt.directory / str(start))
            state = ckpt.restore(start, layout.abstract, iterator)
        else:
            start = 0
            if config.model.init_from:
                state = _state_from_hf(config, tx, layout)
            else:
                state = create_state(config.model, config.seed, tx, layout)
        ltd_setup = None
        if efficiency and efficiency.ltd_layers:
            ltd_setup = LTDSetup(efficiency.ltd_layers, config.seed, config.random_ltd.attention_implementation)
        if compressed:
            if ltd_setup is not None:
                raise UserError(f"config key 'random_ltd': random-LTD is not available with "
                                f"optimizer.name={config.optimizer.name}; use optimizer.name=adamw")
            # Per-device metrics are reduced only on the steps that log them (no extra collective otherwise).
            train_step = compressed.train_step(config.train.grad_accum, summarize=lambda s: (
                s % config.train.log_every == 0 or s in (start + 1, total_steps)))
        else:
            train_step = make_train_step(model_def, tx, schedule, layout, config.train.grad_accum, ltd=ltd_setup)
        eval_step = make_eval_step(model_def, layout)
    if lead:
        truncate_after(workdir / "metrics.jsonl", start)
    total_steps = efficiency.total_steps if efficiency else config.train.steps
    if efficiency and not compressed and config.train.background_compile:
        signatures = [(efficiency.rows(t), efficiency.seq_len(t), efficiency.kept(t))
                      for t in range(start, total_steps)]
        if len(set(signatures)) > 1:  # later shapes compile while the earlier ones train
            train_step = StepPrograms(train_step, signatures, mesh)
    writer = MetricsWriter(workdir, total_steps, start, config.log.tensorboard,
                           config.log.progress_bar) if lead else None

    tokens_per_step = batch_size * config.data.seq_len
    timed_tokens, timed_layer_tokens = 0, 0  # with data efficiency, tokens vary by step
    local_multiple = max(1, mesh_lib.data_parallel_size(mesh) * config.train.grad_accum // slots)
    peak, _ = peak_flops(config.model.compute_dtype)
    flops = flops_per_token(config.model, config.data.seq_len)
    last_row: dict[str, Any] = {}
    timer, timed_steps, step = time.perf_counter(), 0, start
    try:
        with jax.set_mesh(mesh):
            while step < total_steps:
                if efficiency is None:
                    state, metrics = train_step(state, _to_global(next(iterator), sharding, batch_size))
                    timed_tokens += tokens_per_step
                    timed_layer_tokens += tokens_per_step
                else:
                    batch = efficiency.prepare(next(iterator), step, local_multiple)
                    global_batch = _to_global(batch, sharding, batch["inputs"].shape[0] * slots)
                    if ltd_setup is None:
                        state, metrics = train_step(state, global_batch)
                    else:
                        state, metrics = train_step(state, global_batch, efficiency.kept(step))
                    timed_tokens += efficiency.tokens(step)
                    timed_layer_tokens += efficiency.layer_tokens(step)
                step += 1
                timed_steps += 1
                fault_point("kill_after_step", step)
                if writer:
                    writer.advance()
                row: dict[str, Any] = {}
                if step % config.train.log_every == 0 or step in (start + 1, total_steps):
                    host = jax.device_get(metrics)
                    elapsed = time.perf_counter() - timer
                    tokens_per_sec = timed_tokens / elapsed
                    row = {"step": step, "loss": float(host["loss"]), "lr": float(host["lr"]),
                           "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tokens_per_sec,
                           "mfu": timed_layer_tokens / elapsed * flops / peak,
                           "skipped_steps": int(jax.device_get(state["skipped_steps"]))}
                    if efficiency:
                        row |= {"seq_len": efficiency.seq_len(step - 1), "kept_length": efficiency.kept(step - 1),
                                "consumed_tokens": efficiency.budget.consumed[step] if efficiency.budget else None,
                                "train_step_compilations": _compilations(train_step)}
                        row = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in row.items()
                               if v is not None}
                final_eval = efficiency is not None and efficiency.budget is not None and step == total_steps
                if eval_batches and (step % config.eval.every == 0 or final_eval):
                    evaluated = _evaluate(eval_step, state["params"], eval_batches, sharding, batch_size)
                    row = {"step": step, **row, **evaluated}
                if row:
                    last_row = row
                    if writer:
                        writer.write(row)
                    timer, timed_steps, timed_tokens, timed_layer_tokens = time.perf_counter(), 0, 0, 0
                if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == total_steps:
                    ckpt.save(step, state, iterator, meta)
    finally:
        if isinstance(train_step, StepPrograms):
            train_step.close()
        ckpt.close()
        if writer:
            writer.close()
    return last_row


def _compilations(jitted) -> int | None:
    """How many programs a jitted function has compiled (one per batch shape / static kept length)."""
    if isinstance(jitted, StepPrograms):
        return jitted.compiled
    size = getattr(jitted, "_cache_size", None)
    return size() if callable(size) else None


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.load(args.config, overrides)
        train(config, Path(args.workdir), dry=args.dry_run)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
