"""The training loop steps 1 and 2 share (step 3 has its own, with the experience phase): jitted steps,
metric rows, periodic evaluation and async checkpoints, resuming from the newest checkpoint exactly as
`jaxllm.train` does (the data iterator's position is saved with the state)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.checkpoint import Checkpointer, fault_point
from jaxllm.data.pipeline import RowSource, stack_rows
from jaxllm.metrics import truncate_after
from jaxllm.rlhf.common import Writer
from jaxllm.rlhf.config import RLHFConfig


def eval_batches(source: RowSource, batch_size: int, limit: int = 0, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every held-out row (or the first `limit` batches) in fixed-size batches, in row order.

    The last batch is filled up with copies of row 0 whose `weight` is 0, so every real row counts
    once; each process gets every `process_count`-th row of a global batch.
    """
    count = -(-len(source) // batch_size)
    if limit:
        count = min(count, limit)
    batches = []
    for k in range(count):
        rows = range(k * batch_size + process_index, (k + 1) * batch_size, process_count)
        real = [i < len(source) for i in rows]
        batch = stack_rows([source[i if ok else 0] for i, ok in zip(rows, real, strict=True)])
        batch["weight"] = np.asarray(real, np.float32)
        batches.append(batch)
    return batches


def train_loop(
    config: RLHFConfig,
    workdir: Path,
    state: Any,
    start: int,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    next_batch: Callable[[], Any],
    ckpt: Checkpointer,
    iterator: Any,
    meta: dict[str, Any],
    evaluate: Callable[[Any], dict[str, float]] | None,
    row_fn: Callable[[dict[str, Any], float, int], dict[str, Any]],
    headline: tuple[str, ...],
) -> tuple[Any, dict[str, Any]]:
    """Runs steps `start + 1 .. train.steps`; returns the final state and the last logged row.

    `row_fn(host_metrics, seconds, steps)` turns a step's metrics into the logged row (without
    `step`); `evaluate(state)` returns held-out metrics, logged every `eval.every` steps and at the end.
    """
    lead = jax.process_index() == 0
    total = config.train.steps
    if lead:
        truncate_after(workdir / "metrics.jsonl", start)
    writer = Writer(workdir, total, start, config.log.tensorboard, config.log.progress_bar, headline) if lead else None
    last: dict[str, Any] = {}
    timer, timed, step = time.perf_counter(), 0, start
    try:
        while step < total:
            state, metrics = step_fn(state, next_batch())
            step += 1
            timed += 1
            fault_point("kill_after_step", step)
            if writer:
                writer.advance()
            row: dict[str, Any] = {}
            if step % config.train.log_every == 0 or step in (start + 1, total):
                host = jax.device_get(metrics)
                row = {"step": step, **row_fn(host, time.perf_counter() - timer, timed),
                       "skipped_steps": int(jax.device_get(state["skipped_steps"]))}
            if evaluate is not None and ((config.eval.every and step % config.eval.every == 0) or step == total):
                row = {"step": step, **row, **evaluate(state)}
            if row:
                last = row
                if writer:
                    writer.write(row)
                timer, timed = time.perf_counter(), 0
            if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == total:
                ckpt.save(step, state, iterator, meta)
    finally:
        ckpt.close()
        if writer:
            writer.close()
    return state, last
