"""1-bit LAMB (Li et al. 2021, arXiv:2104.06069) as an Optax transform, following DeepSpeed's code.

LAMB scales each tensor's Adam step by a trust ratio ||p|| / ||u||. 1-bit LAMB warms up as LAMB while
recording a running average of each tensor's ratio, then freezes the variance and the ratio, exchanges
all momenta as one 1-bit compressed buffer, and adjusts the frozen ratio by how far a variance
re-estimated from the exchanged momenta has drifted from the frozen one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from jaxllm.optim import _common as common
from jaxllm.optim.onebit_adam import COMPRESSED, EXACT, last_warmup_step  # the same two phases
from jaxllm.optim.onebit_allreduce import CompressionState, compressed_allreduce, init_compression_state


class OneBitLambState(NamedTuple):
    count: Int[Array, ""]  # updates applied so far; the step being computed is t = count + 1
    mu: optax.Updates  # momentum, the same on every device
    nu: optax.Updates  # second moment, frozen after freeze_step
    nu_fresh: optax.Updates  # second moment re-estimated from exchanged momenta in the compressed phase
    coeff_freeze: Any  # per leaf: running average of the warm-up trust ratio (f32 scalars)
    last_factor: Any  # per leaf: the previous step's adjustment factor
    scaling_coeff: Any  # per leaf: momentum scale equaliser, fixed at the first compressed step (0: unset)
    local: CompressionState  # per device: error buffers of the one flattened momentum buffer


def onebit_lamb(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    freeze_step: int = 100_000,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    coeff_beta: float = 0.9,
    factor_max: float = 4.0,
    factor_min: float = 0.5,
    factor_threshold: float = 0.1,
    *,
    axis_name: str | None = None,
    exact_dtype: Any = None,
    weight_decay_mask: Any = None,
    exp_avg_mask: Any = None,
    norm_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """1-bit LAMB: LAMB with frozen variance and trust ratios and 1-bit momentum exchange.

    Per tensor, with t the 1-based step, g this device's gradient, mean() the exact average over
    `axis_name`, CAR the error-feedback 1-bit all-reduce and wd the tensor's weight decay:

    Warm-up (t <= F = max(freeze_step, 2), as `onebit_adam`), LAMB:
        g = mean(g); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; v_fresh = v at t == F
        u = m / (sqrt(v) + eps) + wd p;  c = clip(||p|| / ||u||, min_coeff, max_coeff) (1 if a norm is 0)
        c_freeze = coeff_beta c_freeze + (1 - coeff_beta) c  whenever c != 1;   update = -lr c u
    Compressed (t > F), v frozen:
        at the first such step sc = mean_q RMS(m_q) / RMS(m) (fixed afterwards; 1 where RMS(m) = 0)
        m_prev = m; all tensors' (b1 m + (1-b1) g) sc flattened into one buffer -> CAR -> m = . / sc
        g' = (m - b1 m_prev) / (1 - b1); v_fresh = b2 v_fresh + (1-b2) g'^2
        d = sqrt(v) + eps; u = m / d + wd p; f = max(d / (sqrt(v_fresh) + eps))
        if wd > 0: r = min(1, ||m / d|| / ||u||); f = f r + 1 - r
        f = clip(f, factor_min, factor_max), then clip to last_f (1 -+ factor_threshold)
        update = -lr c_freeze f u

    No bias correction (DeepSpeed's behaviour). The first step is a real update (DeepSpeed spends it
    allocating buffers), the compressed phase starts after step freeze_step as in DeepSpeed. The
    padding of the flattened buffer is zero on every exchange (DeepSpeed carries the previous
    exchange's values there; they are discarded either way).

    Args: as `onebit_adam`, plus DeepSpeed's LAMB coefficients, and `norm_axes`: when the leaves are
    shards of larger tensors (inside a `shard_map` over model axes), a tree like the params of tuples of
    mesh axis names each leaf is split over, so that norms and maxima cover the whole tensor.
    `update(..., phase=EXACT | COMPRESSED)` traces only that phase.

    Example (one worker)::

        tx = onebit_lamb(1e-3, freeze_step=100, weight_decay=0.01)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
    """

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        scalars = lambda value: jax.tree.map(lambda _: jnp.full([], value, jnp.float32), params)  # noqa: E731
        total = sum(p.size for p in jax.tree.leaves(params))
        return OneBitLambState(
            count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(), nu_fresh=zeros(), coeff_freeze=scalars(0.0),
            last_factor=scalars(1.0), scaling_coeff=scalars(0.0),
            local=init_compression_state(total, common.world_size(axis_name)))

    def update_fn(updates, state, params=None, *, phase: int | None = None, **extra_args):
        del extra_args
        world, t, lr, decay = common.step_inputs(state.count, params, learning_rate, weight_decay, weight_decay_mask,
                                                 axis_name)
        sums, maxes = common.leaf_reducers(norm_axes, params)
        norm = lambda x, s: jnp.sqrt(s(jnp.square(x.astype(jnp.float32))))  # noqa: E731

        def exact():
            g = common.exact_mean(updates, axis_name, exact_dtype)
            mu, nu = common.adam_moments(state.mu, state.nu, g, b1, b2)
            nu_fresh = common.tree_select(t == last_warmup_step(freeze_step), nu, state.nu_fresh)
            u = jax.tree.map(lambda m, v, p, wd: m / (jnp.sqrt(v) + eps) + wd * p, mu, nu, params, decay)

            def coeff(p, u, s):
                wn, un = norm(p, s), norm(u, s)
                return jnp.where((wn > 0) & (un > 0), jnp.clip(wn / jnp.where(un > 0, un, 1), min_coeff, max_coeff),
                                 1.0)

            c = jax.tree.map(coeff, params, u, sums)
            c_freeze = jax.tree.map(lambda c, cf: jnp.where(c != 1.0, coeff_beta * cf + (1 - coeff_beta) * c, cf),
                                    c, state.coeff_freeze)
            new_updates = jax.tree.map(lambda c, u: -lr * c * u, c, u)
            return new_updates, mu, nu, nu_fresh, c_freeze, state.last_factor, state.scaling_coeff, state.local

        def compressed():
            # Momentum scales are equalised once, from the momenta at the end of the warm-up.
            rms = jax.tree.map(lambda m, s: jnp.sqrt(s(jnp.square(m.astype(jnp.float32))) / s(jnp.float32(m.size))),
                               state.mu, sums)
            rms_leaves = jax.tree.leaves(rms)
            united = sum(rms_leaves) / len(rms_leaves)
            fresh_sc = jax.tree.map(lambda r: jnp.where(r > 0, united / jnp.where(r > 0, r, 1), 1.0), rms)
            sc = jax.tree.map(lambda old, new: jnp.where(old > 0, old, new), state.scaling_coeff, fresh_sc)

            mu = jax.tree.map(lambda m, g, c: (b1 * m + (1 - b1) * g) * c, state.mu, updates, sc)
            local = state.local
            if world > 1:
                flat, unravel = common.ravel_f32(mu)
                flat, local = compressed_allreduce(flat, local, axis_name)
                mu = common.cast_like(unravel(flat), mu)
            mu = jax.tree.map(lambda m, c: m / c, mu, sc)
            mu = common.apply_momentum_mask(mu, exp_avg_mask)

            grad_rebuilt = jax.tree.map(lambda m, prev: (m - b1 * prev) / (1 - b1), mu, state.mu)
            nu_fresh = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu_fresh, grad_rebuilt)

            denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, state.nu)
            prelim = jax.tree.map(jnp.divide, mu, denom)
            u = jax.tree.map(lambda pre, p, wd: pre + wd * p, prelim, params, decay)

            def adjust(d, vf, pre, u, wd, s, mx, last):
                factor = mx((d / (jnp.sqrt(vf) + eps)).astype(jnp.float32))
                un = norm(u, s)
                ratio = jnp.minimum(1.0, norm(pre, s) / jnp.where(un > 0, un, 1))
                factor = jnp.where((wd > 0) & (un > 0), factor * ratio + 1.0 - ratio, factor)
                factor = jnp.clip(factor, factor_min, factor_max)
                return jnp.clip(factor, last * (1.0 - factor_threshold), last * (1.0 + factor_threshold))

            factor = jax.tree.map(adjust, denom, nu_fresh, prelim, u, decay, sums, maxes, state.last_factor)
            new_updates = jax.tree.map(lambda cf, f, u: -lr * cf * f * u, state.coeff_freeze, factor, u)
            return new_updates, mu, state.nu, nu_fresh, state.coeff_freeze, factor, sc, local

        reference = (params, state.mu, state.nu, state.nu_fresh, state.coeff_freeze, state.last_factor,
                     state.scaling_coeff, state.local)
        computed = jnp.where(t > last_warmup_step(freeze_step), COMPRESSED, EXACT)
        new_updates, mu, nu, nu_fresh, c_freeze, last, sc, local = common.switch_typed(
            phase, computed, [exact, compressed], reference)
        return new_updates, OneBitLambState(optax.safe_increment(state.count), mu, nu, nu_fresh, c_freeze, last,
                                            sc, local)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
