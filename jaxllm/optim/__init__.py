"""Optax optimizers and schedules; `build_optimizer(config)` turns the config into a transform.

Besides Optax's AdamW, DeepSpeed's communication-efficient optimizers: `onebit_adam`,
`zero_one_adam` and `onebit_lamb`, built on the error-feedback 1-bit collective
`compressed_allreduce` (run them inside `jax.shard_map`; see `jaxllm.engine.onebit` for the
train step that does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import ONEBIT_PARAMS, Config
from jaxllm.models.stacking import stacked_leaf
from jaxllm.optim import onebit_adam as _onebit_adam_module
from jaxllm.optim import zero_one_adam as _zero_one_adam_module
from jaxllm.optim.onebit_adam import OneBitAdamState, onebit_adam, onebit_adam_phase
from jaxllm.optim.onebit_allreduce import (
    DEVICE_AXIS,
    CompressionState,
    compressed_allreduce,
    compressed_allreduce_tree,
    init_compression_state,
    pack_signs,
    padded_size,
    unpack_signs,
)
from jaxllm.optim.onebit_lamb import OneBitLambState, onebit_lamb
from jaxllm.optim.schedules import warmup_cosine
from jaxllm.optim.zero_one_adam import (
    ZeroOneAdamLocal,
    ZeroOneAdamSchedule,
    ZeroOneAdamState,
    local_params,
    zero_one_adam,
)

ONEBIT_OPTIMIZERS = ("onebit_adam", "zero_one_adam", "onebit_lamb")


def _decay_mask(params):
    """Weight decay applies to matrices (projections, embeddings), not to norms and biases (a stacked
    block weight's first axis counts blocks, `jaxllm.models.stacking`)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - stacked_leaf(path) >= 2, params)


def build_optimizer(config: Config, schedule: optax.Schedule | None = None, *, norm_axes: Any = None
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for `config.optimizer` and the learning-rate schedule it follows.

    adamw: global-norm clipping chained with Optax's AdamW. The 1-bit optimizers are returned
    bare, set up for the per-device train step (`jaxllm.engine.onebit`, data axis `DEVICE_AXIS`),
    which clips each device's own gradient before they see it. `norm_axes` (1-bit LAMB only): the mesh
    axes each parameter's shard is split over inside that step, so norms cover whole tensors.
    `schedule` replaces the step-based warm-up + cosine (random-LTD's LayerToken schedule does).
    """
    opt, train = config.optimizer, config.train
    if schedule is None:
        schedule = warmup_cosine(train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
    if opt.name == "adamw":
        return optax.chain(*adamw_parts(config, schedule)), schedule
    builders = {"onebit_adam": onebit_adam, "zero_one_adam": zero_one_adam, "onebit_lamb": onebit_lamb}
    # Each 1-bit optimizer takes its DeepSpeed-named parameters (ONEBIT_PARAMS) under their config names.
    extra = {k: opt.param(k) for k in ONEBIT_PARAMS[opt.name]}
    extra |= {"norm_axes": norm_axes} if opt.name == "onebit_lamb" else {"bias_correction": opt.bias_correction}
    exact_dtype = None if opt.exact_allreduce_dtype == "float32" else jnp.dtype(opt.exact_allreduce_dtype)
    tx = builders[opt.name](schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                            axis_name=DEVICE_AXIS, weight_decay_mask=_decay_mask, exact_dtype=exact_dtype, **extra)
    return tx, schedule


def adamw_parts(config: Config, schedule: optax.Schedule
                ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """AdamW as `build_optimizer` chains it, in its two parts: the global-norm clipping, which reads
    the whole gradient, then Optax's AdamW, which is elementwise given the step count, so it may update
    the parameters a piece at a time (`jaxllm.engine.offload`). `optax.chain(*parts)` is the optimizer."""
    opt = config.optimizer
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    return clip, optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=_decay_mask)


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """Which phase each step of a 1-bit optimizer is in, decided on the host."""

    names: tuple[str, ...]  # phase index -> name
    phase: Callable[[int], int]  # 1-based step -> phase index


class _ZeroOneAdamPhases:
    """`ZeroOneAdamSchedule.phase` with the computed prefix kept, so each step costs O(1)."""

    def __init__(self, schedule: ZeroOneAdamSchedule):
        self.schedule, self.known = schedule, []

    def __call__(self, step: int) -> int:
        if step > len(self.known):
            self.known = self.schedule.phases(max(step, 2 * len(self.known)))
        return self.known[step - 1]


def phase_plan(config: Config) -> PhasePlan:
    """The phase schedule of `config.optimizer` (a 1-bit optimizer)."""
    opt = config.optimizer
    if opt.name in ("onebit_adam", "onebit_lamb"):
        freeze = opt.param("freeze_step")  # 1-bit LAMB switches phase at the same step as 1-bit Adam
        return PhasePlan(_onebit_adam_module.PHASES, lambda step: onebit_adam_phase(step, freeze))
    if opt.name == "zero_one_adam":
        schedule = ZeroOneAdamSchedule(**{k: opt.param(k) for k in ONEBIT_PARAMS[opt.name]})
        return PhasePlan(_zero_one_adam_module.PHASES, _ZeroOneAdamPhases(schedule))
    raise ValueError(f"optimizer {opt.name!r} has no phases (it is not a 1-bit optimizer)")


__all__ = [
    "ONEBIT_OPTIMIZERS",
    "adamw_parts",
    "DEVICE_AXIS",
    "CompressionState",
    "OneBitAdamState",
    "OneBitLambState",
    "PhasePlan",
    "ZeroOneAdamLocal",
    "ZeroOneAdamSchedule",
    "ZeroOneAdamState",
    "build_optimizer",
    "compressed_allreduce",
    "compressed_allreduce_tree",
    "init_compression_state",
    "local_params",
    "onebit_adam",
    "onebit_adam_phase",
    "onebit_lamb",
    "pack_signs",
    "padded_size",
    "phase_plan",
    "unpack_signs",
    "warmup_cosine",
    "zero_one_adam",
]
