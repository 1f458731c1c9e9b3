"""The optimizer of a run as the engine sees it: an Optax transform and its schedule, or a compressed
optimizer whose state and step are laid out per device, and the loss-spike guard that may skip its
steps. Tasks build it here and never branch on it."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from jax.sharding import Mesh

from jaxllm.engine.loss_spike import LossSpikeGuard
from jaxllm.engine.onebit import OneBitTraining, is_onebit
from jaxllm.engine.state import ParamTree, StateLayout, state_layout
from jaxllm.errors import UserError
from jaxllm.optim import adamw_parts, build_optimizer


@dataclasses.dataclass(frozen=True)
class TrainOptimizer:
    """`tx` initialises the optimizer state (for a 1-bit optimizer, every device's); `schedule` is
    the learning rate by step; `onebit` is set for 1-bit Adam, 0/1 Adam and 1-bit LAMB; `loss_spike`
    when `train.loss_spike_factor` is on."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    onebit: OneBitTraining | None = None
    offload: str = "none"  # mesh.offload
    compute_dtype: str = "float32"  # model.compute_dtype: the devices' copy of offloaded parameters
    loss_spike: LossSpikeGuard | None = None
    # `tx` as (global part, elementwise part), `optax.chain(*parts) == tx`: lets an offloaded update
    # stream the state a block at a time (`jaxllm.engine.offload`); None for other optimizers.
    parts: tuple[optax.GradientTransformation, optax.GradientTransformation] | None = None

    def layout(self, mesh: Mesh, model: Any, zero_stage: int, frozen: tuple[str, ...] = (),
               buffers: Any = None) -> StateLayout:
        """The state layout of `model` (a `ModelDef` or `ParamTree`) trained with this optimizer."""
        opt_state = self.onebit.opt_state_layout() if self.onebit else None
        return state_layout(mesh, model, self.tx, zero_stage, frozen, opt_state, buffers, self.offload,
                            self.loss_spike is not None, self.compute_dtype)

    def signature(self) -> dict[str, Any] | None:
        """What the saved optimizer state is bound to (None: it restores onto any mesh)."""
        return self.onebit.signature() if self.onebit else None


def offload_setting(config: Any, reads_params: str | None = None) -> str:
    """`config.mesh.offload`, refused where it cannot work: the parameters in host memory for a task
    whose `reads_params` (PPO's generation) reads them outside the train and eval steps, or with a
    float32 compute dtype (the devices' copy would save nothing)."""
    offload = config.mesh.offload
    if offload == "optimizer_and_params" and reads_params:
        raise UserError(f"config key 'mesh.offload': got {offload!r}; expected 'none' or 'optimizer' here: "
                        f"{reads_params} reads the trained parameters outside the train step, from device memory")
    if offload == "optimizer_and_params" and config.model.compute_dtype == "float32":
        raise UserError(f"config key 'mesh.offload': got {offload!r} with model.compute_dtype=float32; the devices' "
                        "copy of the parameters would be as large as they are, saving nothing: set "
                        "model.compute_dtype=bfloat16 or mesh.offload=optimizer")
    return offload


def build(config: Any, mesh: Mesh, model: Any, frozen: tuple[str, ...] = (),
          schedule: optax.Schedule | None = None, reads_params: str | None = None) -> TrainOptimizer:
    """The optimizer of `config.optimizer` for the trainable parameters of `model` (all groups but
    `frozen`). `schedule` replaces the config's warm-up + cosine learning rate (random-LTD's LayerToken
    schedule, PPO's per-model rates). `reads_params` names what of the task reads the trainable
    parameters outside the train and eval steps (PPO's generation), which refuses them host memory."""
    offload = offload_setting(config, reads_params)
    loss_spike = LossSpikeGuard.from_config(config)
    if is_onebit(config):
        if offload != "none":
            raise UserError(f"config key 'mesh.offload': got {offload!r}; expected 'none' with "
                            f"optimizer.name={config.optimizer.name} (its state is laid out per device and "
                            "stepped in shard_map; offload works with adamw)")
        params = ParamTree(model.logical_axes, model.shapes)
        if frozen:
            params = params.subset(tuple(k for k in params.shapes if k not in frozen))
        onebit = OneBitTraining(config, mesh, params, schedule)
        return TrainOptimizer(onebit.state_tx, onebit.schedule, onebit, loss_spike=loss_spike)
    tx, schedule = build_optimizer(config, schedule)
    parts = adamw_parts(config, schedule) if config.optimizer.name == "adamw" else None
    return TrainOptimizer(tx, schedule, offload=offload, compute_dtype=config.model.compute_dtype,
                          loss_spike=loss_spike, parts=parts)
