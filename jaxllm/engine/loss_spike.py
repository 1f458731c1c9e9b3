"""The loss-spike guard: a step whose loss jumps far above the recent level is skipped.

Large runs meet rare batches whose loss is many times the running level, and applying their update
can throw training off course for thousands of steps. With `train.loss_spike_factor: F` (0: off) the
train step (`jaxllm.engine.step`, and the 1-bit path) treats a step as a spike when

    loss_t > F * mean_t,    mean_t = ema_t / (1 - d ** n_t),    d = 1 - 1 / W

where `ema` is the exponential moving average of the losses of the `n_t` steps accepted so far
(`ema <- d * ema + (1 - d) * loss` on each accepted step, bias-corrected as Adam's moments are) and
`W = train.loss_spike_window`. The guard acts only once `n_t >= W`, so the fast fall of the first
steps' loss sets the level instead of tripping it. A spike is handled as a non-finite step: parameters
and optimizer state stay, `skipped_steps` counts it, and a spike does not enter the mean. A run that
keeps spiking stops through the loop's `train.max_skipped_steps`, like a diverged one.

The guard's state is three scalars in the training state, `loss_guard = {"ema", "accepted", "spikes"}`
(the last counts the spikes skipped, which the loop logs as `loss_spikes`), saved with every
checkpoint; a checkpoint written without the guard resumes with it from zeros
(`jaxllm.engine.checkpoint`), as a fresh run starts.

Example:
    >>> guard = LossSpikeGuard(factor=3.0, window=2)
    >>> state = guard.init()
    >>> for loss in (2.0, 2.0):
    ...     state = guard.update(state, jnp.float32(loss), jnp.bool_(True), jnp.bool_(False))
    >>> bool(guard.is_spike(state, jnp.float32(7.0))), bool(guard.is_spike(state, jnp.float32(5.0)))
    (True, False)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

KEY = "loss_guard"


class LossSpikeGuard(NamedTuple):
    factor: float
    window: int

    @classmethod
    def from_config(cls, config: Any) -> LossSpikeGuard | None:
        """The guard `config.train` asks for, or None when `train.loss_spike_factor` is 0."""
        train = config.train
        return cls(train.loss_spike_factor, train.loss_spike_window) if train.loss_spike_factor else None

    @staticmethod
    def init() -> dict[str, jax.Array]:
        return {"ema": jnp.zeros((), jnp.float32), "accepted": jnp.zeros((), jnp.int32),
                "spikes": jnp.zeros((), jnp.int32)}

    @staticmethod
    def abstract() -> dict[str, jax.ShapeDtypeStruct]:
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        return {"ema": jax.ShapeDtypeStruct((), jnp.float32), "accepted": scalar, "spikes": scalar}

    @property
    def decay(self) -> float:
        return 1.0 - 1.0 / self.window

    def mean(self, state: dict[str, jax.Array]) -> jax.Array:
        """The bias-corrected running mean of the accepted losses (0 before the first one)."""
        accepted = state["accepted"]
        return jnp.where(accepted > 0, state["ema"] / (1.0 - self.decay ** accepted.astype(jnp.float32)), 0.0)

    def is_spike(self, state: dict[str, jax.Array], loss: jax.Array) -> jax.Array:
        return (state["accepted"] >= self.window) & (loss > self.factor * self.mean(state))

    def update(self, state: dict[str, jax.Array], loss: jax.Array, accepted: jax.Array, spike: jax.Array
               ) -> dict[str, jax.Array]:
        """The state after a step: an accepted step's loss enters the mean, a skipped one leaves it as
        is; a spike is counted."""
        ema = self.decay * state["ema"] + (1.0 - self.decay) * loss.astype(jnp.float32)
        return {"ema": jnp.where(accepted, ema, state["ema"]),
                "accepted": state["accepted"] + accepted.astype(jnp.int32),
                "spikes": state["spikes"] + spike.astype(jnp.int32)}
