"""The training loop, written once for every task: steps, metric rows, evaluation, checkpoints, resume.

A task hands the loop one `step_fn(state, step) -> (state, metrics, work)` (it fetches its batch and
calls its jitted step; a PPO round generates, scores and trains inside it), a `row_fn` that turns the
metrics into a logged row, and an `evaluate`. The loop owns the cadence: a row at every
`log_every`-th step, at the first step after a start or resume and at the last; evaluation at every
`eval.every`-th step (and at the end when asked); an async checkpoint every `checkpoint.every` steps
and at the end. Rows go to `metrics.jsonl`, TensorBoard and the progress bar (process 0 only); rows
logged after the step a run resumes from are dropped first, so they are never written twice.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxllm import runtime
from jaxllm.engine.checkpoint import Checkpointer, fault_point
from jaxllm.metrics import MetricsWriter, truncate_after

# step_fn(state, step) -> (state, device metrics of the step, host numbers summed between rows)
StepFn = Callable[[Any, int], tuple[Any, Any, dict[str, float]]]
# row_fn(step, host metrics of that step, summed host numbers, seconds, steps since the last row) -> row
RowFn = Callable[[int, dict[str, Any], dict[str, float], float, int], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Cadence:
    total_steps: int
    log_every: int
    eval_every: int  # 0: no periodic evaluation
    checkpoint_every: int  # 0: only at the end
    eval_at_end: bool = True

    @classmethod
    def from_config(cls, config: Any, total_steps: int | None = None, eval_at_end: bool = True) -> Cadence:
        return cls(config.train.steps if total_steps is None else total_steps, config.train.log_every,
                   config.eval.every, config.checkpoint.every, eval_at_end)


def logged_steps(config: Any, start: int, total_steps: int | None = None) -> Callable[[int], bool]:
    """Which (1-based) steps `run` logs a row after: a 1-bit optimizer's step reduces its
    per-device metrics on those steps only."""
    total = config.train.steps if total_steps is None else total_steps
    return lambda step: step % config.train.log_every == 0 or step in (start + 1, total)


def run(config: Any, workdir: Path, cadence: Cadence, state: Any, start: int, step_fn: StepFn, row_fn: RowFn,
        evaluate: Callable[[Any, int], dict[str, Any]] | None, ckpt: Checkpointer, iterator: Any,
        meta: dict[str, Any], headline: tuple[str, ...] | None = None,
        closing: tuple[Callable[[], None], ...] = ()) -> tuple[Any, dict[str, Any]]:
    """Runs steps `start + 1 .. cadence.total_steps`; returns the final state and the last logged row.

    `evaluate(state, step)` returns held-out metrics; `closing` functions run when the loop ends, however
    it ends (after the checkpointer has finished writing)."""
    total = cadence.total_steps
    writer = None
    if runtime.is_lead():
        truncate_after(workdir / "metrics.jsonl", start)
        writer = MetricsWriter(workdir, total, start, config.log.tensorboard, config.log.progress_bar, headline)
    last: dict[str, Any] = {}
    work: dict[str, float] = {}
    timer, timed, step = time.perf_counter(), 0, start
    try:
        while step < total:
            state, metrics, done = step_fn(state, step)
            step += 1
            timed += 1
            for k, v in done.items():
                work[k] = work.get(k, 0.0) + v
            fault_point("kill_after_step", step)
            if writer:
                writer.advance()
            row: dict[str, Any] = {}
            if step % cadence.log_every == 0 or step in (start + 1, total):
                host = jax.device_get(metrics)
                row = {"step": step, **row_fn(step, host, work, time.perf_counter() - timer, timed),
                       "skipped_steps": int(jax.device_get(state["skipped_steps"]))}
            final = step == total and cadence.eval_at_end
            if evaluate is not None and ((cadence.eval_every and step % cadence.eval_every == 0) or final):
                row = {"step": step, **row, **evaluate(state, step)}
            if row:
                last = row
                if writer:
                    writer.write(row)
                timer, timed, work = time.perf_counter(), 0, {}
            if (cadence.checkpoint_every and step % cadence.checkpoint_every == 0) or step == total:
                ckpt.save(step, state, iterator, meta)
    finally:
        ckpt.close()
        if writer:
            writer.close()
        for close in closing:
            close()
    return state, last
