"""The optimizer update with its state in host memory (`mesh.offload=optimizer`), streamed through the
devices a piece at a time, as ZeRO-Offload streams its optimizer state.

Copying the whole host state to the devices before the update (`jaxllm.mesh.to_device`) saves nothing
at the update's peak: the compiler brings every moment onto the chip at once. Here the update runs in
loops whose every iteration copies one piece of the state in, updates it and writes it back to host
memory before the next piece is read (a copy inside a loop body cannot be hoisted out of it):

- the stacked decoder blocks (`[slots, ...]`, `jaxllm.models.stacking`): one loop, one slot per
  iteration, every block weight at once;
- each other weight larger than half a block (the embedding, the head): its own loop over pieces of
  an axis that every device holds whole, no piece larger than a block;
- the rest (norms, step counts) whole.

So the devices hold about one block's moments at a time instead of the whole state. The optimizer
comes in two parts (`jaxllm.optim.adamw_parts`): a first part that reads the whole gradient
(global-norm clipping) and an elementwise part (AdamW), which each piece runs on its own elements, the
other leaves standing in as empty arrays. The arithmetic per element is the whole update's: the same
parameters and moments, bit for bit.
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
    """How a loop cuts a leaf: `pieces` slices of `size` along `axis`."""

    loop: str  # the leaves of one loop share its name and its count of pieces
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


def piece_plan(params: Any, state: Any, shardings: Any) -> tuple[list[Piece | None], list[Piece | None], list[bool]]:
    """The piece plan of each parameter leaf and of each state leaf (a moment shares its parameter's;
    None: updated whole), and which state leaves mirror a parameter (the others are step counts)."""
    param_paths = [_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    param_leaves = jax.tree.leaves(params)
    state_paths = [_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]

    def mirror(path):  # the parameter a state leaf mirrors: the longest parameter path it ends with
        ends = [i for i, p in enumerate(param_paths) if len(p) <= len(path) and path[len(path) - len(p):] == p]
        return max(ends, key=lambda i: len(param_paths[i])) if ends else None

    mirrors = [mirror(p) for p in state_paths]
    sharding_of = {m: s for m, s in zip(mirrors, jax.tree.leaves(shardings), strict=True) if m is not None}
    stacked = [i for i, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(params)) if stacked_leaf(p)]
    slots = param_leaves[stacked[0]].shape[0]
    piece = max(param_leaves[i].size for i in stacked) // slots  # elements of the largest block weight

    plans: list[Piece | None] = [None] * len(param_leaves)
    for i in stacked:
        plans[i] = Piece(f"leaf {i}", 0, 1, slots)
    for i, x in enumerate(param_leaves):
        if plans[i] is not None or i not in sharding_of or 2 * x.size <= piece:
            continue
        if sharding_of[i].shard_shape(x.shape)[-1] < LANES:
            continue  # the TPU compiler would lay the array out transposed, its cut axis then the lanes
        for axis, length in enumerate(x.shape[:-1]):
            want = max(2, math.ceil(x.size / piece))
            pieces = next((d for d in range(want, length + 1)
                           if length % d == 0 and (axis < x.ndim - 2 or (length // d) % SUBLANES == 0)), None)
            if pieces and _whole(sharding_of[i], axis):
                plans[i] = Piece(f"leaf {i}", axis, length // pieces, pieces)
                break
    return plans, [None if m is None else plans[m] for m in mirrors], [m is not None for m in mirrors]


def update(parts: tuple[optax.GradientTransformation, optax.GradientTransformation], grads: Any, opt_state: Any,
           params: Any, accept: jax.Array, opt_shardings: Any) -> tuple[Any, Any]:
    """(new parameters, new optimizer state in host memory) of `optax.chain(*parts)`'s update, each
    kept only where `accept` (a skipped step leaves both unchanged). Call inside `jit`, with `streams`."""
    first, elementwise = parts
    first_state, state = opt_state  # optax.chain's state: one per part
    first_shardings, shardings = opt_shardings
    grads, first_state = first.update(grads, mesh_lib.to_device(first_state, first_shardings), params)
    param_plans, state_plans, mirrors = piece_plan(params, state, shardings)

    keep = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
    empty = lambda x: jnp.zeros((0, *x.shape[1:]), x.dtype)  # noqa: E731 -- a stand-in of the same rank
    host_shardings = jax.tree.leaves(shardings)

    def to(x, s, kind):
        return jax.device_put(x, s.with_memory_kind(kind)) if s.memory_kind == mesh_lib.HOST_MEMORY else x

    p_leaves, p_def = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(grads)
    s_leaves, s_def = jax.tree.flatten(state)

    # The leaves updated whole: one update, the streamed leaves standing in empty.
    whole_state = [empty(x) if plan else to(x, s, mesh_lib.DEVICE_MEMORY)
                   for x, s, plan in zip(s_leaves, host_shardings, state_plans, strict=True)]
    whole_params = [empty(x) if plan else x for x, plan in zip(p_leaves, param_plans, strict=True)]
    whole_grads = [empty(x) if plan else x for x, plan in zip(g_leaves, param_plans, strict=True)]
    updates, new_whole = elementwise.update(p_def.unflatten(whole_grads), s_def.unflatten(whole_state),
                                            p_def.unflatten(whole_params))
    new_params = [keep(n, o) for n, o in zip(jax.tree.leaves(optax.apply_updates(p_def.unflatten(whole_params),
                                                                                 updates)), whole_params, strict=True)]
    new_state = [to(keep(n, o), s, mesh_lib.HOST_MEMORY)
                 for n, o, s in zip(jax.tree.leaves(new_whole), whole_state, host_shardings, strict=True)]

    for loop in dict.fromkeys(plan.loop for plan in param_plans if plan):
        ps = [i for i, plan in enumerate(param_plans) if plan and plan.loop == loop]
        ss = [j for j, plan in enumerate(state_plans) if plan and plan.loop == loop]

        def body(k, carry, ps=ps, ss=ss):
            param_pieces, moment_pieces = carry
            piece = lambda x, cut: jax.lax.dynamic_slice_in_dim(x, k * cut.size, cut.size, cut.axis)  # noqa: E731
            p = {i: piece(x, param_plans[i]) for i, x in zip(ps, param_pieces, strict=True)}
            m = {j: to(piece(x, state_plans[j]), host_shardings[j], mesh_lib.DEVICE_MEMORY)
                 for j, x in zip(ss, moment_pieces, strict=True)}
            g = [piece(x, param_plans[i]) if i in p else empty(x) for i, x in enumerate(g_leaves)]
            slot_params = p_def.unflatten([p.get(i, empty(x)) for i, x in enumerate(p_leaves)])
            # This piece's moments; the step counts as the whole update read them; other moments empty.
            slot_state = s_def.unflatten([m[j] if j in m else empty(x) if mirrors[j] else whole_state[j]
                                          for j, x in enumerate(s_leaves)])
            updates, new = elementwise.update(p_def.unflatten(g), slot_state, slot_params)
            new_p = jax.tree.leaves(optax.apply_updates(slot_params, updates))
            new_m = jax.tree.leaves(new)
            put = lambda x, v, cut: jax.lax.dynamic_update_slice_in_dim(x, v, k * cut.size, cut.axis)  # noqa: E731
            return ([put(x, keep(new_p[i], p[i]), param_plans[i]) for i, x in zip(ps, param_pieces, strict=True)],
                    [put(x, to(keep(new_m[j], m[j]), host_shardings[j], mesh_lib.HOST_MEMORY), state_plans[j])
                     for j, x in zip(ss, moment_pieces, strict=True)])

        pieces = param_plans[ps[0]].pieces
        done_p, done_m = jax.lax.fori_loop(0, pieces, body, ([p_leaves[i] for i in ps], [s_leaves[j] for j in ss]))
        for i, x in zip(ps, done_p, strict=True):
            new_params[i] = x
        for j, x in zip(ss, done_m, strict=True):
            new_state[j] = x
    return p_def.unflatten(new_params), (mesh_lib.to_host(first_state, first_shardings), s_def.unflatten(new_state))
