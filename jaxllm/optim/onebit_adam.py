"""1-bit Adam (Tang et al. 2021, arXiv:2102.02888) as an Optax transform, following DeepSpeed's code.

Runs on each device inside `jax.shard_map` with that device's own gradient; all communication over the
data axis happens in here: an exact average while warming up, the error-feedback 1-bit collective
afterwards. Outside `shard_map` (`axis_name=None`) it is the same optimizer on one worker.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from jaxllm.optim import _common as common

EXACT, COMPRESSED = 0, 1
PHASES = ("exact", "compressed")


class OneBitAdamState(NamedTuple):
    count: Int[Array, ""]  # updates applied so far; the step being computed is t = count + 1
    mu: optax.Updates  # momentum, the same on every device
    nu: optax.Updates  # second moment, frozen once the compressed phase starts
    local: Any  # per device: one `CompressionState` (worker/server error) per leaf


def last_warmup_step(freeze_step):
    """The last exact step: freeze_step, but at least 2 (DeepSpeed never checks the freeze on its
    initialisation call, step 1, so its step 2 is always a warm-up step)."""
    return jnp.maximum(freeze_step, 2) if isinstance(freeze_step, jax.Array) else max(freeze_step, 2)


def onebit_adam_phase(step: int, freeze_step: int) -> int:
    """Phase of 1-based `step`: `EXACT` for steps 1..max(freeze_step, 2), `COMPRESSED` after."""
    return EXACT if step <= last_warmup_step(freeze_step) else COMPRESSED


def onebit_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    freeze_step: int = 100_000,
    *,
    bias_correction: bool = False,
    axis_name: str | None = None,
    exact_dtype: Any = None,
    weight_decay_mask: Any = None,
    exp_avg_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """1-bit Adam: Adam whose momentum is exchanged as 1-bit codes once the variance is frozen.

    With t the 1-based step, g this device's gradient, mean() the exact average over `axis_name` and
    CAR the error-feedback 1-bit all-reduce (`jaxllm.optim.compressed_allreduce`):

        warm-up (t <= freeze_step):  g = mean(g);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        compressed (t > freeze_step): m = CAR(b1 m + (1 - b1) g)  (then m *= exp_avg_mask); v frozen
        update = -lr (m / (sqrt(v) + eps) + weight_decay p)

    As in DeepSpeed there is no bias correction by default (`bias_correction=True`, jaxllm's option,
    divides m by 1 - b1^t and v by 1 - b2^k, k = min(t, max(freeze_step, 2)) the number of variance
    updates), weight decay is decoupled (AdamW-like), and with a single device nothing is compressed.
    Unlike DeepSpeed the first step is a real update (DeepSpeed spends it allocating buffers) while the
    phase switch stays at the same step: steps 1..max(freeze_step, 2) are exact, the following ones
    compressed.

    Args:
      learning_rate: a float or an Optax schedule of the update count.
      b1, b2, eps, weight_decay: Adam's coefficients; DeepSpeed's defaults.
      freeze_step: the last exact (warm-up) step (at least step 2 is, as in DeepSpeed).
      axis_name: the data axis of the enclosing `shard_map`; None for a single worker.
      exact_dtype: the dtype the exact (uncompressed) gradient averages travel in, e.g.
        `jnp.bfloat16` for half the bytes of f32 (DeepSpeed's engine all-reduces them in fp16);
        None keeps the gradient's dtype.
      weight_decay_mask: a tree of bools like the params, or a callable returning one; None decays all.
      exp_avg_mask: optional tree of 0/1 arrays multiplied into the momentum after each compressed
        exchange (for entries whose momentum is exactly zero, which 1-bit codes cannot represent).

    `update(grads, state, params, phase=None)`: pass `phase=EXACT` or `COMPRESSED` (a Python int)
    to trace only that branch, e.g. to compile one program per phase; by default the phase follows
    the state's step counter through `lax.switch`.

    Example (one worker)::

        tx = onebit_adam(1e-3, freeze_step=100)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return OneBitAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params),
                               local=common.init_leaf_compression(params, axis_name))

    def update_fn(updates, state, params=None, *, phase: int | None = None, **extra_args):
        del extra_args
        world, t, lr, decay = common.step_inputs(state.count, params, learning_rate, weight_decay, weight_decay_mask,
                                                 axis_name)

        def exact():
            g = common.exact_mean(updates, axis_name, exact_dtype)
            return *common.adam_moments(state.mu, state.nu, g, b1, b2), state.local

        def compressed():
            mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
            local = state.local
            if world > 1:
                mu, local = common.exchange_leaves(mu, local, axis_name)
            return common.apply_momentum_mask(mu, exp_avg_mask), state.nu, local

        computed = jnp.where(t > last_warmup_step(freeze_step), COMPRESSED, EXACT)
        mu, nu, local = common.switch_typed(phase, computed, [exact, compressed], (state.mu, state.nu, state.local))
        c1, c2 = 1.0, 1.0
        if bias_correction:
            c1 = 1 - b1 ** t.astype(jnp.float32)
            c2 = 1 - b2 ** jnp.minimum(t, last_warmup_step(freeze_step)).astype(jnp.float32)
        new_updates = jax.tree.map(
            lambda m, v, p, wd: (-lr * (m / c1 / (jnp.sqrt(v / c2) + eps) + wd * p)).astype(p.dtype),
            mu, nu, params, decay)
        return new_updates, OneBitAdamState(optax.safe_increment(state.count), mu, nu, local)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
