"""0/1 Adam (Lu et al. 2022, arXiv:2202.06009) as an Optax transform, following DeepSpeed's code.

0/1 Adam saves communication twice over 1-bit Adam: while the variance still moves it is refreshed
with an exact all-reduce only on steps whose interval doubles every `var_update_scaler` refreshes
(other steps exchange 1-bit gradients); after `var_freeze_step` each device takes local steps and the
devices synchronise only every `local_step_interval` steps, an interval that doubles every
`local_step_scaler` steps up to `local_step_clipper`. Steps without a synchronisation communicate
nothing at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from jaxllm.optim import _common as common

EXACT_VARIANCE, COMPRESSED_GRADIENT, LOCAL, SYNC = 0, 1, 2, 3
PHASES = ("exact_variance", "compressed_gradient", "local", "sync")
COMMUNICATING = (True, True, False, True)  # phase -> whether it exchanges anything over the data axis


class ZeroOneAdamLocal(NamedTuple):
    """State that differs between devices (stored per device by the compressed train step)."""

    mu: optax.Updates  # momentum; local steps update it from this device's gradient
    momentum_accumulator: optax.Updates  # -sum(lr * u) since the last sync: this device's local progress
    comm: Any  # one `CompressionState` per leaf


class ZeroOneAdamState(NamedTuple):
    count: Int[Array, ""]  # updates applied so far; the step being computed is t = count + 1
    nu: optax.Updates  # second moment, refreshed only on exact-variance steps
    lrs: Float[Array, ""]  # learning rates summed since the last sync
    var_interval: Int[Array, ""]
    var_counter: Int[Array, ""]
    local_step_interval: Int[Array, ""]
    local_step_counter: Int[Array, ""]
    local: ZeroOneAdamLocal


@dataclasses.dataclass(frozen=True)
class ZeroOneAdamSchedule:
    """The host-side phase of every step, from DeepSpeed's counter rules (pure Python).

    Step t (1-based) is in the variance phase while t <= max(var_freeze_step, 1) + 1 (DeepSpeed
    freezes at the end of the first step with t > var_freeze_step, but never checks on step 1):
    `EXACT_VARIANCE` if t % var_interval == 0, else `COMPRESSED_GRADIENT`; each exact step advances
    var_counter, and every `var_update_scaler` of them var_interval doubles. Later steps are `SYNC`
    if t % local_step_interval == 0, else `LOCAL`; every such step advances local_step_counter, and
    every `local_step_scaler` of them local_step_interval = min(local_step_clipper, 2 *
    local_step_interval). Step 1 is DeepSpeed's initialisation call: here it is a real exact update
    but, as there, it advances no counter, so every step has the phase DeepSpeed gives it.
    """

    var_freeze_step: int = 100_000
    var_update_scaler: int = 16
    local_step_scaler: int = 32678
    local_step_clipper: int = 16

    def phases(self, steps: int) -> list[int]:
        """Phases of steps 1..steps."""
        out = []
        var_interval, var_counter, local_interval, local_counter = 1, 0, 1, 0
        for t in range(1, steps + 1):
            in_variance_phase = t <= max(self.var_freeze_step, 1) + 1
            if in_variance_phase:
                out.append(EXACT_VARIANCE if t % var_interval == 0 else COMPRESSED_GRADIENT)
            else:
                out.append(SYNC if t % local_interval == 0 else LOCAL)
            if t == 1:
                continue
            if in_variance_phase:
                if t % var_interval == 0:
                    var_counter += 1
                    if var_counter == self.var_update_scaler:
                        var_counter, var_interval = 0, var_interval * 2
            else:
                local_counter += 1
                if local_counter == self.local_step_scaler:
                    local_counter, local_interval = 0, min(self.local_step_clipper, local_interval * 2)
        return out

    def phase(self, step: int) -> int:
        return self.phases(step)[-1]


def zero_one_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    var_freeze_step: int = 100_000,
    var_update_scaler: int = 16,
    local_step_scaler: int = 32678,
    local_step_clipper: int = 16,
    *,
    bias_correction: bool = False,
    axis_name: str | None = None,
    exact_dtype: Any = None,
    weight_decay_mask: Any = None,
    exp_avg_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """0/1 Adam: 1-bit gradients, rare exact variance refreshes, then local steps with 1-bit syncs.

    With t the 1-based step, g this device's gradient, p_loc = params + acc this device's parameters,
    u = m / (sqrt(v) + eps) + weight_decay * p_loc, mean() the exact average over `axis_name` and CAR
    the error-feedback 1-bit all-reduce, the phase (see `ZeroOneAdamSchedule`) decides:

        EXACT_VARIANCE:      g = mean(g); v = b2 v + (1 - b2) g^2; m = b1 m + (1 - b1) g; update = -lr u
        COMPRESSED_GRADIENT: m = b1 m + (1 - b1) CAR(g);                             update = -lr u
        LOCAL:               m = b1 m + (1 - b1) g; lrs += lr; acc -= lr u;          update = 0
        SYNC:                as LOCAL, then d = sqrt(v) + eps; a = CAR(acc * d);
                             m = -a / lrs; update = a / d; acc = lrs = 0

    Error buffers are zeroed once, after the last variance-phase step (they change meaning from
    gradients to accumulated updates). Decoupled weight decay. No bias correction by default, as in
    DeepSpeed; `bias_correction=True` (jaxllm's option) divides m by 1 - b1^t and v by 1 - b2^k in u,
    with k the number of EXACT_VARIANCE steps so far (read from the interval counters), and the sync's
    d is then (1 - b1^t) (sqrt(v / (1 - b2^k)) + eps), so that acc * d is still the accumulated
    momentum and the momentum restored from it is not rescaled at every sync.

    Local progress lives in the state, not in the parameters: between syncs the parameters returned by
    `optax.apply_updates` stay the last synchronised ones, identical on every device, and this
    device's gradient must be taken at `local_params(params, state)` = params + acc (DeepSpeed moves
    its parameters and subtracts acc again at the sync; the two agree up to rounding).

    Args: as `onebit_adam`, plus DeepSpeed's `var_freeze_step`, `var_update_scaler`,
    `local_step_scaler` and `local_step_clipper` (defaults are DeepSpeed's). `update(..., phase=k)`
    with a Python int traces only phase k (only its collectives are compiled); by default the phase
    follows the state's counters through `lax.switch`.

    Example (one worker)::

        tx = zero_one_adam(1e-3, var_freeze_step=1000)
        state = tx.init(params)
        grads = jax.grad(loss)(local_params(params, state), batch)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    """

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        one, zero = jnp.ones([], jnp.int32), jnp.zeros([], jnp.int32)
        local = ZeroOneAdamLocal(mu=zeros(), momentum_accumulator=zeros(),
                                 comm=common.init_leaf_compression(params, axis_name))
        return ZeroOneAdamState(count=zero, nu=zeros(), lrs=jnp.zeros([], jnp.float32), var_interval=one,
                                var_counter=zero, local_step_interval=one, local_step_counter=zero, local=local)

    def update_fn(updates, state, params=None, *, phase: int | None = None, **extra_args):
        del extra_args
        world, t, lr, decay = common.step_inputs(state.count, params, learning_rate, weight_decay, weight_decay_mask,
                                                 axis_name)
        loc = state.local
        p_local = jax.tree.map(jnp.add, params, loc.momentum_accumulator)
        ema = lambda m, g: b1 * m + (1 - b1) * g  # noqa: E731

        def corrections(refreshed):
            """(1 - b1^t, 1 - b2^k) with bias correction, else (1, 1); `refreshed` is 1 when this step
            updated the variance."""
            if not bias_correction:
                return 1.0, 1.0
            # Variance updates so far, from the counters: step 1's (it advances no counter), the
            # counted ones (var_update_scaler per doubling of var_interval), and this step's.
            doublings = jnp.log2(state.var_interval.astype(jnp.float32)).round()
            refreshes = doublings * var_update_scaler + state.var_counter + (t > 1) + refreshed
            return 1 - b1 ** t.astype(jnp.float32), 1 - b2 ** jnp.maximum(refreshes, 1).astype(jnp.float32)

        def direction(mu, nu, refreshed):
            """u = m / c1 / (sqrt(v / c2) + eps) + wd p."""
            c1, c2 = corrections(refreshed)
            return jax.tree.map(lambda m, v, p, wd: m / c1 / (jnp.sqrt(v / c2) + eps) + wd * p, mu, nu, p_local,
                                decay)

        def step_with(mu, nu, comm, refreshed):  # EXACT_VARIANCE and COMPRESSED_GRADIENT update at once
            u = direction(mu, nu, refreshed)
            new_updates = jax.tree.map(lambda u: -lr * u, u)
            return new_updates, nu, state.lrs, ZeroOneAdamLocal(mu, loc.momentum_accumulator, comm)

        def exact_variance():
            g = common.exact_mean(updates, axis_name, exact_dtype)
            mu, nu = common.adam_moments(loc.mu, state.nu, g, b1, b2)
            return step_with(mu, nu, loc.comm, 1)

        def compressed_gradient():
            g, comm = updates, loc.comm
            if world > 1:
                g, comm = common.exchange_leaves(g, comm, axis_name)
            g = common.apply_momentum_mask(g, exp_avg_mask)
            return step_with(jax.tree.map(ema, loc.mu, g), state.nu, comm, 0)

        def local_step():
            mu = jax.tree.map(ema, loc.mu, updates)
            u = direction(mu, state.nu, 0)
            acc = jax.tree.map(lambda a, u: a - lr * u, loc.momentum_accumulator, u)
            zero = jax.tree.map(jnp.zeros_like, updates)
            return zero, state.nu, state.lrs + lr, ZeroOneAdamLocal(mu, acc, loc.comm)

        def sync():
            _, nu, lrs, new_loc = local_step()
            # acc * denom turns the accumulated updates back into accumulated momentum, sum(lr * m), so
            # the momentum restored below is the momentum itself, bias correction or not.
            c1, c2 = corrections(0)
            denom = jax.tree.map(lambda v: c1 * (jnp.sqrt(v / c2) + eps), nu)
            buf = jax.tree.map(jnp.multiply, new_loc.momentum_accumulator, denom)
            comm = new_loc.comm
            if world > 1:
                buf, comm = common.exchange_leaves(buf, comm, axis_name)
            buf = common.apply_momentum_mask(buf, exp_avg_mask)
            # DeepSpeed divides by lrs unguarded; a zero learning-rate sum keeps the momentum instead.
            mu = jax.tree.map(lambda a, m: jnp.where(lrs > 0, -a / jnp.where(lrs > 0, lrs, 1), m), buf, new_loc.mu)
            new_updates = jax.tree.map(jnp.divide, buf, denom)
            acc = jax.tree.map(jnp.zeros_like, new_loc.momentum_accumulator)
            return new_updates, nu, jnp.zeros_like(lrs), ZeroOneAdamLocal(mu, acc, comm)

        last_variance_step = jnp.maximum(var_freeze_step, 1) + 1
        in_variance_phase = t <= last_variance_step
        computed = jnp.where(in_variance_phase,
                             jnp.where(t % state.var_interval == 0, EXACT_VARIANCE, COMPRESSED_GRADIENT),
                             jnp.where(t % state.local_step_interval == 0, SYNC, LOCAL))
        branches = [exact_variance, compressed_gradient, local_step, sync]
        types = (params, state.nu, state.lrs, loc)  # every branch returns (updates like params, nu, lrs, local)
        new_updates, nu, lrs, new_loc = common.switch_typed(phase, computed, branches, types)
        # The error buffers switch from gradients to accumulated updates: reset them once.
        comm = common.tree_select(t == last_variance_step, jax.tree.map(jnp.zeros_like, new_loc.comm), new_loc.comm)
        new_loc = new_loc._replace(comm=comm)

        # Counters, advanced after the step exactly as DeepSpeed does (not at step 1, its init call).
        counting = t > 1
        var_step = counting & in_variance_phase & (t % state.var_interval == 0)
        var_counter = state.var_counter + var_step.astype(jnp.int32)
        var_full = var_counter == var_update_scaler
        var_counter = jnp.where(var_full, 0, var_counter)
        var_interval = jnp.where(var_full, state.var_interval * 2, state.var_interval)
        local_counting = counting & ~in_variance_phase
        local_counter = state.local_step_counter + local_counting.astype(jnp.int32)
        local_full = local_counter == local_step_scaler
        local_counter = jnp.where(local_full, 0, local_counter)
        local_interval = jnp.where(local_full, jnp.minimum(local_step_clipper, state.local_step_interval * 2),
                                   state.local_step_interval)

        new_state = ZeroOneAdamState(
            count=optax.safe_increment(state.count), nu=nu, lrs=lrs,
            var_interval=var_interval.astype(jnp.int32), var_counter=var_counter.astype(jnp.int32),
            local_step_interval=local_interval.astype(jnp.int32), local_step_counter=local_counter.astype(jnp.int32),
            local=new_loc)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def local_params(params: Any, opt_state: Any) -> Any:
    """The parameters this device's gradient must be taken at: `params` plus the local progress of
    any `ZeroOneAdamState` inside `opt_state` (any other optimizer state: `params` unchanged)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ZeroOneAdamState))
             if isinstance(s, ZeroOneAdamState)]
    if not found:
        return params
    if len(found) > 1:
        raise ValueError("local_params: the optimizer state holds more than one ZeroOneAdamState")
    return jax.tree.map(lambda p, a: p + a.astype(p.dtype), params, found[0].local.momentum_accumulator)
