"""Curriculum learning: difficulty schedules and sequence-length difficulty, as DeepSpeed defines them.

A curriculum raises the difficulty of the training data with the step. Each difficulty metric has a
schedule given with DeepSpeed's keys (Li et al., 2022, "DeepSpeed Data Efficiency"; DeepSpeed's
`runtime/data_pipeline/curriculum_scheduler.py`):

    {"min_difficulty": 64, "max_difficulty": 512, "schedule_type": "fixed_linear",
     "schedule_config": {"total_curriculum_step": 1000, "difficulty_step": 8}}

`schedule_value(config, step)` is the difficulty DeepSpeed's scheduler gives at `step`:

* ``fixed_linear``: ``d = floor(t / T * (max - min) + min)``, ``d -= d % difficulty_step``,
  ``d = min(d, max)``;
* ``fixed_root``: the same with ``(t / T) ** (1 / root_degree)`` in place of ``t / T``;
* ``fixed_discrete`` with ``difficulty[n + 1]`` and ``max_step[n]``: ``difficulty[i]`` for the first
  ``i`` with ``t <= max_step[i]``, else the last difficulty;
* ``custom``: a Python callable ``step -> difficulty`` (given as the config itself, or as
  ``schedule_config["function"]``).

Step conventions (spec section 3): DeepSpeed's data sampler counts global batches from 1, and its legacy
``curriculum_learning`` calls the scheduler with ``global_steps + 1``; both give the first batch the
difficulty at step 1. `difficulty_for_batch(config, step)` applies that convention to jaxllm's 0-based
training step.

Two metrics need no offline analysis because they act on the batch itself: ``seqlen_truncate`` keeps
the first ``d`` tokens of every row, and ``seqlen_reshape`` folds every row into rows of ``d`` tokens.
Their difficulties are multiples of ``difficulty_step``, which bounds how many batch shapes (and so
how many compilations of the train step) a run can see: at most
``(max - min) / difficulty_step + 2`` for the linear and root schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxllm.errors import UserError

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")
SEQLEN_METRICS = ("seqlen_truncate", "seqlen_reshape")

Schedule = Mapping[str, Any] | Callable[[int], int]


def _get(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise UserError(f"{where}: missing key '{key}'")
    return config[key]


def check_schedule(config: Schedule, where: str = "curriculum schedule") -> None:
    """Raises `UserError` naming `where` and the key if `config` is not a usable schedule.

    Checks what DeepSpeed asserts (required keys, list lengths) and what it does not: min <= max,
    positive step counts and difficulty steps, a sorted `max_step` list.
    """
    if callable(config):
        return
    if not isinstance(config, Mapping):
        raise UserError(f"{where}: got {config!r}; expected a mapping of DeepSpeed schedule keys or a callable")
    low, high = _get(config, "min_difficulty", where), _get(config, "max_difficulty", where)
    for key, value in (("min_difficulty", low), ("max_difficulty", high)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise UserError(f"{where}.{key}: got {value!r}; expected an integer")
    if low > high:
        raise UserError(f"{where}: min_difficulty {low} exceeds max_difficulty {high}; expected min <= max")
    kind = _get(config, "schedule_type", where)
    if kind not in SCHEDULE_TYPES:
        raise UserError(f"{where}.schedule_type: got {kind!r}; expected one of {', '.join(SCHEDULE_TYPES)}")
    sched = config.get("schedule_config") or {}
    inner = f"{where}.schedule_config"
    if kind in ("fixed_linear", "fixed_root"):
        total, step = _get(sched, "total_curriculum_step", inner), _get(sched, "difficulty_step", inner)
        if not total > 0:
            raise UserError(f"{inner}.total_curriculum_step: got {total!r}; expected a positive number of steps")
        if not (isinstance(step, (int, np.integer)) and step > 0):
            raise UserError(f"{inner}.difficulty_step: got {step!r}; expected a positive integer")
        if kind == "fixed_root" and not _get(sched, "root_degree", inner) > 0:
            raise UserError(f"{inner}.root_degree: got {sched['root_degree']!r}; expected a positive number")
    elif kind == "fixed_discrete":
        levels, ends = list(_get(sched, "difficulty", inner)), list(_get(sched, "max_step", inner))
        if not ends or len(levels) != len(ends) + 1:
            raise UserError(f"{inner}: got {len(levels)} difficulties and {len(ends)} max_step entries; expected "
                            "one more difficulty than max_step entries, and at least one max_step")
        if any(b < a for a, b in zip(ends, ends[1:], strict=False)):
            raise UserError(f"{inner}.max_step: got {ends}; expected non-decreasing steps")
    elif not callable(sched.get("function")):
        raise UserError(f"{inner}.function: schedule_type 'custom' needs a callable step -> difficulty")


def _root_value(config: Mapping[str, Any], step: int, degree: float) -> int:
    sched = config["schedule_config"]
    low, high = config["min_difficulty"], config["max_difficulty"]
    value = math.floor((float(step) / sched["total_curriculum_step"]) ** (1.0 / degree) * (high - low) + low)
    value -= value % sched["difficulty_step"]
    return int(min(value, high))


def _discrete_value(config: Mapping[str, Any], step: int) -> int:
    sched = config["schedule_config"]
    levels, ends = sched["difficulty"], sched["max_step"]
    for level, end in zip(levels, ends, strict=False):
        if step <= end:
            return int(level)
    return int(levels[-1])


def schedule_value(config: Schedule, step: int) -> int:
    """The difficulty DeepSpeed's `CurriculumScheduler` gives when updated at `step`.

    DeepSpeed keeps the difficulty once it reaches `max_difficulty`; the linear and root formulas are
    non-decreasing in the step, so evaluating them directly gives the same value. A discrete schedule
    is evaluated the same way (its difficulties are expected to rise with the step).

    Example (DeepSpeed's unit test: fixed_linear 2 -> 10 over 8 steps, difficulty_step 2):

    >>> cfg = {"min_difficulty": 2, "max_difficulty": 10, "schedule_type": "fixed_linear",
    ...        "schedule_config": {"total_curriculum_step": 8, "difficulty_step": 2}}
    >>> [schedule_value(cfg, t) for t in range(1, 11)]
    [2, 4, 4, 6, 6, 8, 8, 10, 10, 10]
    """
    if callable(config):
        return int(config(step))
    kind = config["schedule_type"]
    if kind == "fixed_linear":
        return _root_value(config, step, 1.0)
    if kind == "fixed_root":
        return _root_value(config, step, config["schedule_config"]["root_degree"])
    if kind == "fixed_discrete":
        return _discrete_value(config, step)
    if kind == "custom":
        return int(config["schedule_config"]["function"](step))
    raise UserError(f"schedule_type: got {kind!r}; expected one of {', '.join(SCHEDULE_TYPES)}")


def difficulty_for_batch(config: Schedule, train_step: int) -> int:
    """The difficulty of the batch consumed by 0-based training step `train_step` (scheduler step + 1)."""
    return schedule_value(config, train_step + 1)


def check_seqlen_schedule(config: Schedule, seq_len: int, where: str) -> None:
    """A sequence-length schedule must give lengths in [1, seq_len] at every step.

    Flooring to a multiple of `difficulty_step` gives length 0 while `min_difficulty < difficulty_step`,
    so that is refused here rather than failing inside the model.
    """
    check_schedule(config, where)
    if callable(config) or config["schedule_type"] == "custom":
        return
    high = config["max_difficulty"]
    if high > seq_len:
        raise UserError(f"{where}.max_difficulty: got {high}; a sequence length may not exceed "
                        f"data.seq_len={seq_len}")
    if config["schedule_type"] == "fixed_discrete":
        levels = config["schedule_config"]["difficulty"]
        if min(levels) < 1 or max(levels) > seq_len:
            raise UserError(f"{where}.schedule_config.difficulty: got {levels}; expected lengths in [1, {seq_len}]")
        return
    step = config["schedule_config"]["difficulty_step"]
    if config["min_difficulty"] < step:
        raise UserError(f"{where}.min_difficulty: got {config['min_difficulty']} with difficulty_step {step}; "
                        "the first steps would get length 0; use min_difficulty >= difficulty_step")


# --------------------------------------------------------------------------------------------------
# Sequence-length difficulty applied to a host batch.

Batch = dict[str, np.ndarray]


def truncate_batch(batch: Batch, length: int) -> Batch:
    """``seqlen_truncate``: every row keeps its first `length` tokens (DeepSpeed: ``x[:, :d]``)."""
    if length >= batch["inputs"].shape[1]:
        return batch
    return {k: np.ascontiguousarray(v[:, :length]) for k, v in batch.items()}


def reshape_rows(batch_rows: int, seq_len: int, length: int, row_multiple: int = 1) -> tuple[np.ndarray, int]:
    """Column indices of the folded rows, and how many folded rows a batch keeps.

    Each row of `seq_len` tokens folds into `floor(seq_len / length)` rows of consecutive tokens, plus,
    when `length` does not divide `seq_len`, one more row holding its last `length` tokens. DeepSpeed
    then keeps the first `ceil(batch_rows * seq_len / length)` folded rows; jaxllm rounds that count up
    to a multiple of `row_multiple` (the data-parallel shards) so the batch splits evenly.
    """
    whole = seq_len // length
    starts = [i * length for i in range(whole)] + ([seq_len - length] if seq_len % length else [])
    columns = np.asarray(starts)[:, None] + np.arange(length)[None, :]
    keep = -(-batch_rows * seq_len // length)
    keep = -(-keep // row_multiple) * row_multiple
    return columns, min(keep, batch_rows * len(starts))


def reshape_batch(batch: Batch, length: int, row_multiple: int = 1) -> Batch:
    """``seqlen_reshape``: fold rows into rows of `length` tokens (see `reshape_rows`).

    Positions are re-based so that the first document piece of each folded row starts at 0, as
    `PackedRows(continue_positions=False)` does for whole rows (learned position tables then never see
    a position past the row length).
    """
    rows, seq_len = batch["inputs"].shape
    if length >= seq_len:
        return batch
    columns, keep = reshape_rows(rows, seq_len, length, row_multiple)
    out = {k: v[:, columns].reshape(rows * columns.shape[0], length)[:keep] for k, v in batch.items()}
    segments, positions = out["segment_ids"], out["positions"].copy()
    first = segments == segments[:, :1]
    positions = np.where(first & (segments != 0), positions - positions[:, :1], positions)
    out["positions"] = positions.astype(batch["positions"].dtype)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def apply_seqlen(batch: Batch, metric: str, length: int, row_multiple: int = 1) -> Batch:
    """Applies a sequence-length metric (`seqlen_truncate` or `seqlen_reshape`) at difficulty `length`."""
    if metric == "seqlen_truncate":
        return truncate_batch(batch, length)
    if metric == "seqlen_reshape":
        return reshape_batch(batch, length, row_multiple)
    raise UserError(f"curriculum metric '{metric}': not a sequence-length metric; expected one of "
                    f"{', '.join(SEQLEN_METRICS)}")
