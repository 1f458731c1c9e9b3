"""The optimizer update with its state in host memory (`mesh.offload`), streamed through the devices a
piece at a time, as ZeRO-Offload streams its optimizer state.

Copying the whole host state to the devices before the update (`jaxllm.mesh.to_device`) saves nothing
at the update's peak: the compiler brings every moment onto the chip at once. Here the update runs in
loops whose every iteration copies one piece of the state in, updates it and writes it back to host
memory before the next piece is read (a copy inside a loop body cannot be hoisted out of it):

- each stacked decoder-block weight (`[slots, ...]`, `jaxllm.models.stacking`): its own loop, one
  block per iteration;
- each other weight larger than half the largest of those pieces (the embedding, the head): its own
  loop over pieces of an axis that every device holds whole, no piece larger than that;
- the rest (norms, step counts) whole.

So the devices hold about one block weight's moments at a time instead of the whole state
(docs/offload.md has the compiler's figures). The optimizer comes in two parts
(`jaxllm.optim.adamw_parts`): a first part that reads the whole gradient (global-norm clipping) and an
elementwise part (AdamW), which each piece runs on its own elements, the other leaves standing in as
empty arrays. The arithmetic per element is the whole update's; XLA may still round the last bit
differently inside a loop (`tests/engine/test_offload.py`).

With `mesh.offload=optimizer_and_params` the f32 parameters live in host memory too, as ZeRO-Offload
keeps its master weights: each piece of a parameter comes in with its moments and goes back updated,
and the forward and backward passes read `compute_copy`, the parameters converted to the compute dtype
on their way to the devices, one block per loop iteration.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm import mesh as mesh_lib
from jaxllm.models.stacking import stacked_leaf

# A TPU tiles an f32 array's last two axes by (8, 128) and cannot update a slice of the last (lane) axis
# in a loop: pieces are cut from the other axes, whole multiples of 8 rows from the second-to-last.
SUBLANES, LANES = 8, 128


class Piece(NamedTuple):
    """How the update cuts a weight and its moments: `pieces` slices of `size` along `axis`."""

    axis: int
    size: int
    pieces: int


def streams(opt_shardings: Any) -> bool:
    """Whether `update` can stream this state: it has stacked block moments in host memory whose slot
    axis each device holds whole (not split over pipeline stages)."""
    stacked = [s for path, s in jax.tree_util.tree_leaves_with_path(opt_shardings) if stacked_leaf(path)]
    return bool(stacked) and all(s.memory_kind == mesh_lib.HOST_MEMORY and _whole(s, 0) for s in stacked)


def _whole(sharding: jax.sharding.NamedSharding, axis: int) -> bool:
    """Whether every device holds axis `axis` of an array with this sharding whole."""
    names = sharding.spec[axis] if axis < len(sharding.spec) else None
    names = () if names is None else (names,) if isinstance(names, str) else names
    return all(sharding.mesh.shape[n] == 1 for n in names)


def _key(path: Any) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


def piece_plan(params: Any, state: Any, shardings: Any) -> tuple[list[Piece | None], list[int | None]]:
    """How the update cuts each parameter leaf (None: updated whole), and which parameter leaf each
    state leaf mirrors (its moments; None for a step count), leaves in `jax.tree.leaves` order."""
    param_paths = [_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    weights = jax.tree.leaves(params)

    def mirror(path):  # the longest parameter path the state leaf's path ends with
        ends = [i for i, p in enumerate(param_paths) if path[len(path) - len(p):] == p]
        return max(ends, key=lambda i: len(param_paths[i])) if ends else None

    mirrors = [mirror(_key(p)) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    sharding_of = {m: s for m, s in zip(mirrors, jax.tree.leaves(shardings), strict=True) if m is not None}
    stacked = [i for i, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(params)) if stacked_leaf(p)]
    slots = weights[stacked[0]].shape[0]
    largest = max(weights[i].size for i in stacked) // slots  # elements of the largest block weight

    plans: list[Piece | None] = [Piece(0, 1, slots) if i in stacked else None for i in range(len(weights))]
    for i, x in enumerate(weights):
        if i in stacked or i not in sharding_of or 2 * x.size <= largest:
            continue
        if sharding_of[i].shard_shape(x.shape)[-1] < LANES:
            continue  # the TPU compiler would lay the array out transposed, its cut axis then the lanes
        for axis, length in enumerate(x.shape[:-1]):
            want = max(2, math.ceil(x.size / largest))
            count = next((d for d in range(want, length + 1)
                          if length % d == 0 and (axis < x.ndim - 2 or (length // d) % SUBLANES == 0)), None)
            if count and _whole(sharding_of[i], axis):
                plans[i] = Piece(axis, length // count, count)
                break
    return plans, mirrors


def update(parts: tuple[optax.GradientTransformation, optax.GradientTransformation], grads: Any, opt_state: Any,
           params: Any, accept: jax.Array, opt_shardings: Any, params_shardings: Any) -> tuple[Any, Any]:
    """(new parameters, new optimizer state in host memory) of `optax.chain(*parts)`'s update, each
    kept only where `accept` (a skipped step leaves both unchanged), and each where its shardings place
    it (parameters in host memory with `mesh.offload=optimizer_and_params`). Call inside `jit`, with
    `streams`."""
    first, elementwise = parts
    first_state, state = opt_state  # optax.chain's state: one per part
    first_shardings, shardings = opt_shardings
    grads, first_state = first.update(grads, mesh_lib.to_device(first_state, first_shardings))
    plans, mirrors = piece_plan(params, state, shardings)
    weights, params_def = jax.tree.flatten(params)
    homes = jax.tree.leaves(params_shardings)
    gradients = jax.tree.leaves(grads)
    moments, state_def = jax.tree.flatten(state)
    places = jax.tree.leaves(shardings)

    keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
    empty = lambda x: jnp.zeros((0, *x.shape[1:]), x.dtype)  # noqa: E731 -- stands in for a leaf, same rank

    def run(g, s, p):  # the elementwise update of leaf lists -> (new parameters, new state) leaf lists
        updates, new = elementwise.update(params_def.unflatten(g), state_def.unflatten(s), params_def.unflatten(p))
        return jax.tree.leaves(optax.apply_updates(params_def.unflatten(p), updates)), jax.tree.leaves(new)

    # The leaves updated whole, in one update where the cut leaves stand in empty.
    cut = lambda i: plans[i] is not None  # noqa: E731
    whole_p = [empty(x) if cut(i) else mesh_lib.to_device(x, homes[i]) for i, x in enumerate(weights)]
    whole_s = [empty(x) if m is not None and cut(m) else mesh_lib.to_device(x, places[j])
               for j, (x, m) in enumerate(zip(moments, mirrors, strict=True))]
    new_p, new_s = run([empty(x) if cut(i) else x for i, x in enumerate(gradients)], whole_s, whole_p)
    new_params = [mesh_lib.to_host(keep(n, o), homes[i]) for i, (n, o) in enumerate(zip(new_p, whole_p, strict=True))]
    new_state = [mesh_lib.to_host(keep(n, o), places[j]) for j, (n, o) in enumerate(zip(new_s, whole_s, strict=True))]

    # Each cut weight in its own loop, one piece of it and of its moments per iteration.
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        mine = [j for j, m in enumerate(mirrors) if m == i]

        def body(k, carry, i=i, plan=plan, mine=mine):
            weight, its_moments = carry
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, k * plan.size, plan.size, plan.axis)  # noqa: E731
            p = mesh_lib.to_device(take(weight), homes[i])
            m = [mesh_lib.to_device(take(x), places[j]) for j, x in zip(mine, its_moments, strict=True)]
            fill = iter(m)  # the piece's moments; the step counts as the whole update read them; others empty
            s = [next(fill) if n == i else empty(x) if n is not None else whole_s[j]
                 for j, (x, n) in enumerate(zip(moments, mirrors, strict=True))]
            new_p, new_s = run([take(x) if n == i else empty(x) for n, x in enumerate(gradients)], s,
                               [p if n == i else empty(x) for n, x in enumerate(weights)])
            put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, k * plan.size, plan.axis)  # noqa: E731
            return (put(weight, mesh_lib.to_host(keep(new_p[i], p), homes[i])),
                    [put(x, mesh_lib.to_host(keep(new_s[j], old), places[j]))
                     for j, x, old in zip(mine, its_moments, m, strict=True)])

        new_params[i], done = jax.lax.fori_loop(0, plan.pieces, body, (weights[i], [moments[j] for j in mine]))
        for j, x in zip(mine, done, strict=True):
            new_state[j] = x
    return (params_def.unflatten(new_params),
            (mesh_lib.to_host(first_state, first_shardings), state_def.unflatten(new_state)))


def compute_copy(params: Any, shardings: Any, dtype: Any) -> Any:
    """Inside `jit`: the devices' copy of `params` that the forward and backward passes read, for the
    leaves that `shardings` place in host memory (`mesh.offload=optimizer_and_params`; the others as they
    are). A stacked block matrix comes over one block per loop iteration, converted to `dtype` (the
    model's compute dtype, which its matmuls cast their weights to anyway), so the devices never hold
    its f32 copy whole; the other leaves (the embedding, which the token lookup reads in f32, norms,
    biases) come over whole and unconverted. The loss's gradient with respect to the copy is its
    gradient with respect to the parameters, in `dtype` for the converted leaves."""
    dtype = jnp.dtype(dtype)

    def fetch(path, x, sharding):
        if sharding.memory_kind != mesh_lib.HOST_MEMORY:
            return x
        if not (stacked_leaf(path) and x.ndim >= 3 and _whole(sharding, 0) and dtype.itemsize < x.dtype.itemsize):
            return mesh_lib.to_device(x, sharding)
        on_device = sharding.with_memory_kind(mesh_lib.DEVICE_MEMORY)

        def body(k, out):
            block = mesh_lib.to_device(jax.lax.dynamic_slice_in_dim(x, k, 1), sharding).astype(dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, block, k, 0)

        out = jax.lax.with_sharding_constraint(jnp.zeros(x.shape, dtype), on_device)
        return jax.lax.fori_loop(0, x.shape[0], body, out)

    return jax.tree_util.tree_map_with_path(fetch, params, shardings)
