"""Pieces the communication-efficient optimizers share: exchanges, learning rates, masks, norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxllm.optim.onebit_allreduce import compressed_allreduce_tree, init_compression_state, world_size

NO_PARAMS = "this optimizer needs the parameters: call update(grads, state, params)"


def init_leaf_compression(params: Any, axis_name: str | None) -> Any:
    """One `CompressionState` per leaf (its size padded by DeepSpeed's rule for this axis)."""
    world = world_size(axis_name)
    return jax.tree.map(lambda p: init_compression_state(p.size, world), params)


def exchange_leaves(tree: Any, comm: Any, axis_name: str | None) -> tuple[Any, Any]:
    """Compressed all-reduce of every leaf (own scale and error buffers each, fused collectives)."""
    leaves, treedef = jax.tree.flatten(tree)
    states = treedef.flatten_up_to(comm)
    outs, new = compressed_allreduce_tree([x.reshape(-1) for x in leaves], states, axis_name)
    outs = [o.reshape(x.shape) for o, x in zip(outs, leaves, strict=True)]
    return treedef.unflatten(outs), treedef.unflatten(new)


def exact_mean(tree: Any, axis_name: str | None, dtype: Any = None) -> Any:
    """The uncompressed average over the data axis, as DeepSpeed's engine all-reduce.

    `dtype` None: an f32 `pmean`. A 16-bit `dtype` (e.g. `jnp.bfloat16`, half the bytes, as DeepSpeed's
    fp16 engine all-reduce): each device rounds its share x / W to `dtype`, the shares cross devices as
    16-bit words in a reduce-scatter (all-to-all, then a local f32 sum of the W rows) and the rounded
    sums in an all-gather. A plain all-reduce in bf16 would not do: XLA's CPU backend promotes it to f32.
    """
    if axis_name is None:
        return tree
    if dtype is None:
        return jax.lax.pmean(tree, axis_name)
    if jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"exact_mean: dtype {jnp.dtype(dtype).name} is not a 16-bit float")
    world = world_size(axis_name)
    flat, unravel = ravel_f32(tree)
    n = flat.size
    shares = jnp.pad(flat / world, (0, -n % world)).astype(dtype).reshape(world, -1)  # row j: device j's part
    words = jax.lax.all_to_all(jax.lax.bitcast_convert_type(shares, jnp.uint16), axis_name, 0, 0, tiled=True)
    part = jnp.sum(jax.lax.bitcast_convert_type(words, dtype).astype(jnp.float32), axis=0).astype(dtype)
    gathered = jax.lax.all_gather(jax.lax.bitcast_convert_type(part, jnp.uint16), axis_name)  # [W, n / W]
    mean = jax.lax.bitcast_convert_type(gathered, dtype).astype(jnp.float32).reshape(-1)[:n]
    return cast_like(unravel(mean), tree)


def ravel_f32(tree: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """All leaves of `tree` as one flat f32 vector, and the function that cuts such a vector back into
    f32 leaves shaped like them (`cast_like` restores their dtypes)."""
    return ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


class StepInputs(NamedTuple):
    world: int  # devices on the data axis (1 outside shard_map)
    t: jax.Array  # the 1-based step being computed
    lr: jax.Array  # the learning rate of this step
    decay: Any  # per-leaf weight decay (`decay_rates`)


def step_inputs(count: jax.Array, params: Any, learning_rate: float | optax.Schedule, weight_decay: Any,
                weight_decay_mask: Any, axis_name: str | None) -> StepInputs:
    """What every update of these optimizers starts from; they all need the parameters (weight decay)."""
    if params is None:
        raise ValueError(NO_PARAMS)
    return StepInputs(world_size(axis_name), count + 1, learning_rate_at(learning_rate, count),
                      decay_rates(weight_decay, weight_decay_mask, params))


def adam_moments(mu: Any, nu: Any, g: Any, b1: float, b2: float) -> tuple[Any, Any]:
    """Adam's moment updates, leaf by leaf: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2."""
    return (jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, g),
            jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, g))


def learning_rate_at(learning_rate: float | optax.Schedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def decay_rates(weight_decay: Any, mask: Any, params: Any) -> Any:
    """Per-leaf weight decay: `weight_decay` where `mask` (a tree or a callable on params) is true, else 0."""
    if mask is None:
        return jax.tree.map(lambda _: weight_decay, params)
    flags = mask(params) if callable(mask) else mask
    return jax.tree.map(lambda m, _: jnp.where(m, weight_decay, 0.0), flags, params)


def apply_momentum_mask(mu: Any, exp_avg_mask: Any) -> Any:
    """DeepSpeed's `exp_avg_mask`: 1-bit codes cannot hold exact zeros, so known-zero entries are masked."""
    if exp_avg_mask is None:
        return mu
    return jax.tree.map(lambda m, k: m * k.astype(m.dtype), mu, exp_avg_mask)


def cast_like(tree: Any, reference: Any) -> Any:
    """`tree` with each leaf cast to the dtype of the matching leaf of `reference`."""
    return jax.tree.map(lambda x, r: jnp.asarray(x).astype(jnp.asarray(r).dtype), tree, reference)


def tree_select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def switch_typed(phase: int | None, computed: jax.Array, branches: list[Callable[[], Any]], reference: Any) -> Any:
    """Runs branch `phase` when the caller fixed it (Python int: only that branch is traced, so only
    its collectives are compiled), else `lax.switch` on the phase computed from the state. Outputs are
    cast to the dtypes of `reference`: `lax.switch` needs every branch to return the same types, and the
    state must keep its dtypes across phases."""
    branches = [lambda branch=branch: cast_like(branch(), reference) for branch in branches]
    if phase is not None:
        if not 0 <= phase < len(branches):
            raise ValueError(f"phase {phase} is not one of 0..{len(branches) - 1}")
        return branches[phase]()
    return jax.lax.switch(computed, branches)


Reducer = Callable[[jax.Array], jax.Array]


def leaf_reducers(norm_axes: Any, params: Any) -> tuple[Any, Any]:
    """Per-leaf (sum, max) reductions over the mesh axes a leaf is split over inside `shard_map`.

    `norm_axes` is None (leaves are whole), or a tree like `params` of tuples of axis names.
    """
    if norm_axes is None:
        axes_tree = jax.tree.map(lambda _: (), params)
    else:
        axes_tree = jax.tree.map(lambda a, _: tuple(a), norm_axes, params,
                                 is_leaf=lambda x: isinstance(x, tuple))

    def make(axes: tuple[str, ...], op: str) -> Reducer:
        if op == "sum":
            return (lambda x: jax.lax.psum(jnp.sum(x), axes)) if axes else jnp.sum
        return (lambda x: jax.lax.pmax(jnp.max(x), axes)) if axes else jnp.max

    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    return (jax.tree.map(lambda a: make(a, "sum"), axes_tree, is_leaf=is_axes),
            jax.tree.map(lambda a: make(a, "max"), axes_tree, is_leaf=is_axes))
