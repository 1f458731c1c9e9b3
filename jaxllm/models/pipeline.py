"""Pipeline parallelism: the decoder's blocks split over the `stage` mesh axis, fed micro-batches.

The blocks' weights come stacked in the slot layout of `jaxllm.models.stacking.BlockSlots`, leaves
`[stages * repeats * per_group, ...]`, slot `(s * repeats + r) * per_group + k` holding the `k`-th block
of stage `s`'s `r`-th layer group (block group `r * stages + s`), so that each stage's slots are
contiguous and the slot axis is split over the mesh. One `jax.shard_map`,
manual over `stage` only (the data, fsdp, tensor and sequence axes stay with the compiler), runs a
loop of ticks. At tick `t` stage `s` works on item `i = t - s` (micro-batch `i mod M`, layer group
`i // M`), then `jax.lax.ppermute` passes every stage's result one stage on around the ring: stage
`s + 1` takes it next tick, and what the last stage passes to stage 0 goes into a queue of `M`
slots that stage 0 reads its inputs from (filled with the micro-batches at the start, holding the
outputs at the end).

- gpipe (`repeats` = 1): every micro-batch passes each stage once.
- circular (`repeats` = R > 1): stage `s` holds R layer groups and a micro-batch goes round the ring
  R times; the queue slot a micro-batch left at its previous round is read again `M - S + 1` ticks
  after it was written, so the schedule needs `M >= S`.

Ticks: `T = R M + S - 1`; each stage is busy for `R M` of them, so the idle fraction (the bubble) is
`(S - 1) / (R M + S - 1)`: `(S - 1) / (M + S - 1)` for GPipe, R times fewer idle ticks per unit of
work for the circular schedule. Gradients are autodiff's: the transposed loop is the backward
pipeline, with the ppermutes reversed.

Uneven splits: when `stages * repeats` (the layer groups) does not divide the layer count, every
group gets `per_group = ceil(layers / groups)` slots and the last `groups * per_group - layers` groups
end with one padded slot, a block of zero weights whose output is discarded (the slot passes its input
on), so each group holds `per_group` or `per_group - 1` real blocks (with one slot per group, a padded
group is all padding: BLOOM's 70 layers on 12 stages x 6 groups). Every stage holds at least one
real block as long as there are no more stages than layers. A padded slot's weights stay zero (its
gradient is zero), and checkpoints restore onto any other layout (`jaxllm.models.stacking`). Its
price is compute: a padded slot runs like a real
block, so a stage's tick costs `per_group` blocks whichever it holds (BLOOM's 70 layers on 12 stages:
72 slots, 2/72 of the block compute wasted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from jaxllm.errors import UserError
from jaxllm.mesh import STAGE_AXIS, PipelineSettings

# The name of a slot's weights, cut from its stage's inside the tick loop (see `pipelined_blocks`).
_SLOT_WEIGHTS = "pipeline_slot_weights"
_CUTS = (jax.lax.dynamic_slice_p, jax.lax.squeeze_p, jax.lax.gather_p)
BlockFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # (weights, x, positions, segments)


def ticks(settings: PipelineSettings) -> int:
    return settings.repeats * settings.microbatches + settings.stages - 1


def schedule_table(settings: PipelineSettings) -> np.ndarray:
    """`[ticks, stages]`: the item (`round * M + micro-batch`) each stage works on at each tick, -1
    when it idles. The loop in `pipelined_blocks` follows this table."""
    t = np.arange(ticks(settings))[:, None]
    item = t - np.arange(settings.stages)[None, :]
    return np.where((item >= 0) & (item < settings.repeats * settings.microbatches), item, -1)


def bubble_fraction(settings: PipelineSettings) -> float:
    """Idle stage-ticks over all stage-ticks of the schedule."""
    table = schedule_table(settings)
    return float((table < 0).mean())


def slots(layers: int, groups: int) -> tuple[int, int]:
    """`(per_group, padded)`: the block slots of each layer group and how many of all slots are padding
    (one at the end of each of the last `padded` groups)."""
    per_group = -(-layers // groups)
    return per_group, groups * per_group - layers


def active_slots(layers: int, settings: PipelineSettings) -> np.ndarray:
    """`[repeats, stages, per_group]` bool: which slots hold a real block (False: padding)."""
    groups = settings.stages * settings.repeats
    per_group, padded = slots(layers, groups)
    active = np.ones((groups, per_group), bool)
    active[groups - padded:, -1] = False
    return active.reshape(settings.repeats, settings.stages, per_group)


def group_blocks(layers: int, settings: PipelineSettings) -> list[list[list[int] | None]]:
    """`[stage][round]`: the `[first, last]` real block of each layer group, None for a group of
    padding only (the layout `pipelined_blocks` runs)."""
    active = active_slots(layers, settings)
    first = np.cumsum(np.concatenate([[0], active.reshape(-1).astype(int)]))  # blocks before each slot
    per_group = active.shape[-1]
    out = []
    for stage in range(settings.stages):
        groups = []
        for r in range(settings.repeats):
            g = r * settings.stages + stage
            count = int(active[r, stage].sum())
            start = int(first[g * per_group])
            groups.append([start, start + count - 1] if count else None)
        out.append(groups)
    return out


def check_settings(settings: PipelineSettings, layers: int, rows: int) -> None:
    stages, repeats, micro = settings.stages, settings.repeats, settings.microbatches
    if layers < stages:
        raise UserError(f"config key 'mesh.stage': {layers} layers leave a stage without a block; use at most "
                        f"{layers} stages")
    if rows % micro:
        raise UserError(f"config key 'mesh.pipeline_microbatches': {micro} micro-batches do not divide the "
                        f"{rows} rows the model is given")
    if repeats > 1 and micro < stages:
        raise UserError(f"config key 'mesh.pipeline_microbatches': the circular schedule needs at least "
                        f"mesh.stage={stages} micro-batches, got {micro}")


def _split_rows(x: jax.Array, micro: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...] with rows j * M + a in micro-batch a, so each device's block of rows
    stays on it."""
    return jnp.swapaxes(x.reshape(x.shape[0] // micro, micro, *x.shape[1:]), 0, 1)


def _join_rows(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pipelined_blocks(
    block_fn: BlockFn,
    stacked: Any,
    x: Float[Array, "b l d"],
    positions: Int[Array, "b l"],
    segment_ids: Int[Array, "b l"],
    settings: PipelineSettings,
    active: np.ndarray,
    policy: Callable[..., bool] | None = jax.checkpoint_policies.everything_saveable,
) -> Float[Array, "b l d"]:
    """The blocks (weights `stacked` in the slot layout above, `active`: `[slots]` bool, False for
    padding) applied in order to `x`, pipelined over the `stage` axis of the current mesh.

    `block_fn(weights, x, positions, segment_ids)` runs one block; `policy` is its remat policy
    (`jax.checkpoint`'s; None saves nothing inside a block): the pipeline applies it itself, because
    each slot's weights must be cut from the stage's inside the remat (a block remat'd on its own keeps
    its weights, one copy per tick, for the backward pass)."""
    stages, repeats, micro = settings.stages, settings.repeats, settings.microbatches
    check_settings(settings, int(active.sum()), x.shape[0])
    per_group, padded = active.size // (stages * repeats), not active.all()
    grouped = jax.tree.map(lambda w: w.reshape(stages, repeats, per_group, *w.shape[1:]), stacked)
    active = jnp.asarray(active.reshape(stages, repeats, per_group))
    items = repeats * micro

    def run_block(weights, group, k, h, pos, seg):
        # The slot's weights are cut from the stage's inside the remat, so that the backward pass
        # cuts them again instead of keeping one copy per tick (the stage's weights are loop-invariant
        # and kept once); the block's own remat policy decides the rest.
        slot_weights = jax.tree.map(lambda w: checkpoint_name(w[group, k], _SLOT_WEIGHTS), weights)
        return block_fn(slot_weights, h, pos, seg)

    def saveable(prim, *avals, **params):
        # Nor the cut that makes them, which a policy saving everything would keep. (The name is
        # matched here: jax.checkpoint_policies.save_anything_except_these_names saves every value
        # in jax 0.10.)
        if prim in _CUTS or (prim.name == "name" and params.get("name") == _SLOT_WEIGHTS):
            return False
        return policy is not None and policy(prim, *avals, **params)

    run_block = jax.checkpoint(run_block, policy=saveable)

    def run_slot(weights, active, group, k, h, pos, seg):
        out = run_block(weights, group, k, h, pos, seg)
        # A padded slot passes its input on; `where` gives it the identity's gradient, and its zero
        # weights are no parameter's. An even split keeps the step free of the select.
        return jnp.where(active[group, k], out, h) if padded else out

    def stage_loop(weights, active, xs, pos, seg):
        weights = jax.tree.map(lambda w: w[0], weights)  # this stage's [repeats, per_group, ...]
        active = active[0]
        stage = jax.lax.axis_index(STAGE_AXIS)
        ring = [(s, (s + 1) % stages) for s in range(stages)]

        def tick(carry, t):
            queue, received = carry
            item = t - stage
            slot = jnp.mod(item, micro)
            group = jnp.clip(item // micro, 0, repeats - 1)
            h = jnp.where(stage == 0, queue[jnp.mod(t, micro)], received)
            h, _ = jax.lax.scan(lambda h, k: (run_slot(weights, active, group, k, h, pos[slot], seg[slot]), None),
                                h, jnp.arange(per_group))
            received = jax.lax.ppermute(h, STAGE_AXIS, ring)
            # Stage 0 files what the last stage finished (item t - S + 1) under its micro-batch.
            done = t - (stages - 1)
            done_slot = jnp.mod(done, micro)
            keep = (stage == 0) & (done >= 0) & (done < items)
            queue = queue.at[done_slot].set(jnp.where(keep, received, queue[done_slot]))
            return (queue, received), None

        start = jax.lax.pcast((xs, jnp.zeros_like(xs[0])), (STAGE_AXIS,), to="varying")  # differs per stage
        (queue, _), _ = jax.lax.scan(tick, start, jnp.arange(ticks(settings)))
        return queue[None]

    stage_spec = jax.tree.map(lambda _: PartitionSpec(STAGE_AXIS), grouped)
    run = jax.shard_map(stage_loop, in_specs=(stage_spec, PartitionSpec(STAGE_AXIS), PartitionSpec(),
                                              PartitionSpec(), PartitionSpec()),
                        out_specs=PartitionSpec(STAGE_AXIS), axis_names=frozenset({STAGE_AXIS}))
    queues = run(grouped, active, _split_rows(x, micro), _split_rows(positions, micro), _split_rows(segment_ids, micro))
    return _join_rows(queues[0])  # stage 0's queue holds every micro-batch's output
