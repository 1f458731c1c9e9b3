"""The train step, written once for every task: `step(state, batch) -> (state, metrics)` under `jax.jit`.

A task gives its loss as a `LossFn`: `loss_fn(params, batch, ltd) -> (loss_sum, count, aux_sums)`,
sums over what its batch counts (tokens, pairs, answer tokens), `ltd` the random-LTD plan of the
batch or None. State that the loss updates but nobody trains (XTC's static activation ranges) lives
in the state's `buffers`: the loss reads it as `params["buffers"]` and returns its new value as
`aux_sums["buffers"]`; micro-batches see it in turn, and a skipped step keeps the old value.

The step adds everything else: gradient accumulation over `grad_accum` micro-batches,
the mean over the global count, the skip of a step whose loss or gradient is not finite or whose loss
spikes (`jaxllm.engine.loss_spike`; parameters and optimizer state unchanged, `skipped_steps` + 1),
random-LTD's kept positions, and for a
1-bit optimizer its per-device path (`jaxllm.engine.onebit`) behind the same call. With host
offload (`mesh.offload=optimizer`) the optimizer state comes in from host memory, is copied to the
devices for the update and goes back, all inside the one jitted program; stacked decoder blocks stream
through one at a time (`jaxllm.engine.offload`). With `optimizer_and_params` the parameters live there
too: the passes read a copy in the compute dtype, the update streams them like the state.

Metrics: `loss` (sum / count), `grad_norm`, `lr`, `tokens` (the count), `skipped`, and each aux sum
divided by the count (the reward model's `accuracy` is its correct pairs over its pairs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm import ltd as ltd_lib
from jaxllm import mesh as mesh_lib
from jaxllm.engine import loss_spike, offload
from jaxllm.engine.state import StateLayout

LossFn = Callable[[Any, dict[str, jax.Array], "ltd_lib.LTDPlan | None"],
                  tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def split_micro(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, ...] -> [accum, B / accum, ...], taking rows i * accum + a into micro-batch a so that each
    device's contiguous block of rows stays on that device (no resharding)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)


def with_ltd_indices(batch: dict[str, jax.Array], ltd: ltd_lib.LTDSetup, step: jax.Array, kept: int
                     ) -> dict[str, jax.Array]:
    """The batch with random-LTD's kept positions of this step, `[B, layers, kept]` so that they split
    with the rows. They are drawn from `ltd.seed` and the step (`jaxllm.ltd.ltd_key`), so a resumed run
    redraws them exactly."""
    rows, length = batch["inputs"].shape[:2]
    indices = ltd_lib.sample_kept_indices(ltd_lib.ltd_key(ltd.seed, step), len(ltd.layers), rows, length, kept)
    return {**batch, "ltd_indices": jnp.swapaxes(indices, 0, 1)}


BUFFERS = "buffers"


def gradient_sums(loss_fn: LossFn, params: Any, frozen: Any, batch: dict[str, jax.Array], grad_accum: int,
                  ltd: ltd_lib.LTDSetup | None = None, grad_shardings: Any = None, buffers: Any = None,
                  sum_dtypes: Any = None) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array], Any]:
    """(gradient sum, loss sum, count, aux sums, buffers) of `batch` over `grad_accum` micro-batches,
    the gradient taken with respect to `params` only (`frozen` groups and `buffers` join them in the
    loss; the buffers come back as the last micro-batch left them). The sum takes the dtypes of
    `sum_dtypes` (a tree like `params`; by default the parameters' own)."""

    def micro_loss(p, b, buf):
        plan = None
        if "ltd_indices" in b:
            plan = ltd_lib.LTDPlan(ltd.layers, jnp.swapaxes(b["ltd_indices"], 0, 1), ltd.implementation)
            b = {k: v for k, v in b.items() if k != "ltd_indices"}
        full = {**p, **frozen} if frozen else p
        loss, count, aux = loss_fn(full if buf is None else {**full, BUFFERS: buf}, b, plan)
        aux = dict(aux)
        return loss, (count, aux, aux.pop(BUFFERS, buf))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    constrain = (lambda g: g) if grad_shardings is None else (  # noqa: E731
        lambda g: jax.lax.with_sharding_constraint(g, grad_shardings))

    def accumulate(carry, micro):
        grad_sum, loss_sum, count, aux_sum, buf = carry
        (loss, (n, aux, buf)), grads = grad_fn(params, micro, buf)
        grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, grad_sum)
        return (jax.tree.map(jnp.add, grad_sum, constrain(grads)), loss_sum + loss, count + n,
                jax.tree.map(jnp.add, aux_sum, aux), buf), None

    micro = batch if grad_accum == 1 else split_micro(batch, grad_accum)
    first = micro if grad_accum == 1 else jax.tree.map(lambda x: x[0], micro)
    _, (_, aux_shape, _) = jax.eval_shape(micro_loss, params, first, buffers)
    zero = jnp.float32(0)
    dtypes = params if sum_dtypes is None else sum_dtypes
    init = (constrain(jax.tree.map(lambda p, d: jnp.zeros(p.shape, d.dtype), params, dtypes)), zero, zero,
            jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape), buffers)
    if grad_accum == 1:
        sums, _ = accumulate(init, batch)
    else:
        sums, _ = jax.lax.scan(accumulate, init, micro)
    return sums


def make_train_step(loss_fn: LossFn, optimizer: Any, layout: StateLayout, grad_accum: int = 1,
                    ltd: ltd_lib.LTDSetup | None = None, summarize: Callable[[int], bool] | None = None) -> Callable:
    """The train step of a task: `step(state, batch) -> (state, metrics)`, or `step(state, batch, kept)`
    with random-LTD (`kept`: the static kept length, one compilation per value; None keeps every token).

    `optimizer`: a `jaxllm.engine.optimizer.TrainOptimizer`. Its 1-bit path returns per-device
    metrics except after the steps `summarize(step)` names (by default every step)."""
    if optimizer.onebit is not None:
        return optimizer.onebit.train_step(loss_fn, layout, grad_accum, ltd, summarize, optimizer.loss_spike)
    tx, schedule, guard = optimizer.tx, optimizer.schedule, optimizer.loss_spike
    opt_shardings, params_shardings = layout.state["opt_state"], layout.state["params"]

    def update(grads, opt_state, params, accept):
        """(new parameters, new optimizer state), each the old one where not `accept`."""
        if optimizer.parts is not None and offload.streams(opt_shardings):
            return offload.update(optimizer.parts, grads, opt_state, params, accept, opt_shardings,
                                  params_shardings)
        # From host memory and back when offloaded.
        opt_state = mesh_lib.to_device(opt_state, opt_shardings)
        params = mesh_lib.to_device(params, params_shardings)
        updates, new_opt = tx.update(grads, opt_state, params)
        return (mesh_lib.to_host(_kept(accept, optax.apply_updates(params, updates), params), params_shardings),
                mesh_lib.to_host(_kept(accept, new_opt, opt_state), opt_shardings))

    def step(state, batch, kept=None):
        params = state["params"]
        if kept is not None:
            batch = with_ltd_indices(batch, ltd, state["step"], kept)
        # With the parameters in host memory, the passes read the devices' copy (the same arrays otherwise).
        computed = offload.compute_copy(params, params_shardings, layout.compute_dtype)
        grad_sum, loss_sum, count, aux, buffers = gradient_sums(loss_fn, computed, state.get("frozen"), batch,
                                                                grad_accum, ltd, layout.grads, state.get(BUFFERS),
                                                                params)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        spike = guard.is_spike(state[loss_spike.KEY], loss) if guard else jnp.bool_(False)
        accept = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~spike

        new_params, new_opt = update(grads, state["opt_state"], params, accept)
        new_state = dict(state, step=state["step"] + 1,
                         skipped_steps=state["skipped_steps"] + (~accept).astype(jnp.int32),
                         params=new_params, opt_state=new_opt)
        if buffers is not None:
            new_state[BUFFERS] = _kept(accept, buffers, state[BUFFERS])
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": count,
                   "skipped": (~accept).astype(jnp.int32), **{k: v / denom for k, v in aux.items()}}
        if guard:
            new_state[loss_spike.KEY] = guard.update(state[loss_spike.KEY], loss, accept, spike)
        return new_state, metrics

    static = {"static_argnums": 2} if ltd is not None else {}
    return counted_jit(step, in_shardings=(layout.state, None), out_shardings=(layout.state, None), donate_argnums=0,
                       **static)


def _kept(accept: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step is accepted, else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)


def counted_jit(fn: Callable, **options: Any) -> Any:
    """`jax.jit(fn, **options)` whose `compiled_programs()` says how many programs it has traced: one per
    batch shape and static argument, each compiled once. (JAX's own count, `_cache_size`, reads a cache
    that every jitted function in the process shares and evicts from, so it undercounts in a long run.)"""
    traces = [0]

    def traced(*args, **kwargs):
        traces[0] += 1
        return fn(*args, **kwargs)

    jitted = jax.jit(functools.wraps(fn)(traced), **options)
    jitted.compiled_programs = lambda: traces[0]
    return jitted


def make_eval_step(loss_fn: LossFn, params_shardings: Any = None) -> Callable:
    """`eval_step(params, batch) -> (loss_sum, count, aux_sums)` (every parameter group in `params`;
    buffers are read, not updated)."""
    def step(params, batch):
        if params_shardings is not None:  # offloaded parameters come to the devices
            params = mesh_lib.to_device(params, params_shardings)
        loss, count, aux = loss_fn(params, batch, None)
        return loss, count, {k: v for k, v in aux.items() if k != BUFFERS}

    return jax.jit(step) if params_shardings is None else jax.jit(step, in_shardings=(params_shardings, None))


def evaluate(eval_step: Callable, params: Any, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Held-out means over `batches` (global arrays): `loss` and each aux metric per counted unit, and
    `count` itself; empty without batches."""
    if not batches:
        return {}
    totals: dict[str, float] = {"loss": 0.0, "count": 0.0}
    for batch in batches:
        loss, count, aux = eval_step(params, batch)
        totals["loss"] += float(loss)
        totals["count"] += float(count)
        for k, v in aux.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    denom = max(totals["count"], 1.0)
    return {k: v if k == "count" else v / denom for k, v in totals.items()}
