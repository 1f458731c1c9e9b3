"""The training loop, written once for every task: steps, metric rows, evaluation, checkpoints, resume.

A task hands the loop one `step_fn(state, step) -> (state, metrics, work)` (it fetches its batch and
calls its jitted step; a PPO round generates, scores and trains inside it), a `row_fn` that turns the
metrics into a logged row, and an `evaluate`. The loop owns the cadence: a row at every
`log_every`-th step, at the first step after a start or resume and at the last; evaluation at every
`eval.every`-th step (and at the end when asked); an async checkpoint every `checkpoint.every` steps
and at the end. Rows go to `metrics.jsonl`, TensorBoard and the progress bar (process 0 only); rows
logged after the step a run resumes from are dropped first, so they are never written twice.

A run whose steps keep being skipped (non-finite loss or gradient, or a loss spike, see
`jaxllm.engine.step`) has diverged: after `train.max_skipped_steps` such steps in a row the loop stops
with an error naming the steps, before any further checkpoint. The check reads each step's counter one
step late, so the host never waits for the step it has just queued.
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
from jaxllm.engine.loss_spike import KEY as LOSS_GUARD
from jaxllm.errors import UserError
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
    max_skipped_steps: int = 0  # 0: never stop

    @classmethod
    def from_config(cls, config: Any, total_steps: int | None = None, eval_at_end: bool = True) -> Cadence:
        return cls(config.train.steps if total_steps is None else total_steps, config.train.log_every,
                   config.eval.every, config.checkpoint.every, eval_at_end, config.train.max_skipped_steps)


class DivergenceGuard:
    """Counts the steps in a row whose `skipped_steps` counter went up, from a copy of the counter taken
    after each step and read after the next one is queued."""

    def __init__(self, limit: int):
        self.limit, self.streak = limit, 0
        self._pending: tuple[int, Any] | None = None  # (step, counter after it) not read yet
        self._last: int | None = None

    def after(self, step: int, state: Any) -> None:
        """Call once step `step` is queued; raises UserError when the previous steps diverged."""
        if not self.limit:
            return
        if self._pending is not None:
            done, counter = self._pending
            value = int(jax.device_get(counter))
            self.streak = self.streak + 1 if self._last is not None and value > self._last else 0
            self._last = value
            if self.streak >= self.limit:
                raise UserError(
                    f"training diverged: steps {done - self.streak + 1}..{done} all had a non-finite loss or "
                    f"gradient (or a loss spike, with train.loss_spike_factor on) and were skipped "
                    f"(train.max_skipped_steps={self.limit}); the state was last changed "
                    "before them and no later checkpoint is written. Lower train.lr, check the data, or resume "
                    "from an earlier checkpoint")
        self._pending = (step, state["skipped_steps"] + 0)  # a copy: the state itself is donated next step


def logged_steps(config: Any, start: int, total_steps: int | None = None) -> Callable[[int], bool]:
    """Which (1-based) steps `run` logs a row after: a 1-bit optimizer's step reduces its
    per-device metrics on those steps only."""
    total = config.train.steps if total_steps is None else total_steps
    return lambda step: step % config.train.log_every == 0 or step in (start + 1, total)


def batch_steps(train_step: Callable, iterator: Any, mesh: Any, rows: int) -> StepFn:
    """The `step_fn` of a task whose step is one `train_step` on the iterator's next host batch of `rows`."""

    def step_fn(state, step):
        state, metrics = train_step(state, runtime.to_global(next(iterator), mesh, rows))
        return state, metrics, {}

    return step_fn


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
    guard = DivergenceGuard(cadence.max_skipped_steps)
    timer, timed, step = time.perf_counter(), 0, start
    try:
        while step < total:
            state, metrics, done = step_fn(state, step)
            step += 1
            timed += 1
            guard.after(step, state)
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
                if LOSS_GUARD in state:
                    row["loss_spikes"] = int(jax.device_get(state[LOSS_GUARD]["spikes"]))
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
