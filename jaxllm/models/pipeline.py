"""Pipeline parallelism: the decoder's blocks split over the `stage` mesh axis, fed micro-batches.

The blocks' weights, stacked to `[layers, ...]` (as the scanned decoder stacks them), are reshaped to
`[repeats, stages, per_group, ...]`: block `l = (r * stages + s) * per_group + k` is the `k`-th block
of stage `s`'s `r`-th layer group, and the `stages` axis is split over the mesh. One `jax.shard_map`,
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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from jaxllm.errors import UserError
from jaxllm.mesh import STAGE_AXIS, PipelineSettings

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


def check_settings(settings: PipelineSettings, layers: int, rows: int) -> None:
    stages, repeats, micro = settings.stages, settings.repeats, settings.microbatches
    if layers % (stages * repeats):
        raise UserError(f"config key 'mesh.stage': {layers} layers do not split into mesh.stage={stages} x "
                        f"mesh.pipeline_repeats={repeats} equal layer groups")
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
) -> Float[Array, "b l d"]:
    """The blocks (weights `stacked`, leaves `[layers, ...]`) applied in order to `x`, pipelined over
    the `stage` axis of the current mesh. `block_fn(weights, x, positions, segment_ids)` runs one block."""
    stages, repeats, micro = settings.stages, settings.repeats, settings.microbatches
    layers = jax.tree.leaves(stacked)[0].shape[0]
    check_settings(settings, layers, x.shape[0])
    per_group = layers // (stages * repeats)
    grouped = jax.tree.map(lambda w: w.reshape(repeats, stages, per_group, *w.shape[1:]), stacked)
    items = repeats * micro

    def stage_loop(weights, xs, pos, seg):
        weights = jax.tree.map(lambda w: w[:, 0], weights)  # this stage's [repeats, per_group, ...]
        stage = jax.lax.axis_index(STAGE_AXIS)
        ring = [(s, (s + 1) % stages) for s in range(stages)]

        def tick(carry, t):
            queue, received = carry
            item = t - stage
            slot = jnp.mod(item, micro)
            group = jnp.clip(item // micro, 0, repeats - 1)
            h = jnp.where(stage == 0, queue[jnp.mod(t, micro)], received)
            group_weights = jax.tree.map(lambda w: w[group], weights)
            h, _ = jax.lax.scan(lambda h, w: (block_fn(w, h, pos[slot], seg[slot]), None), h, group_weights)
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

    stage_spec = jax.tree.map(lambda _: PartitionSpec(None, STAGE_AXIS), grouped)
    run = jax.shard_map(stage_loop, in_specs=(stage_spec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
                        out_specs=PartitionSpec(STAGE_AXIS), axis_names=frozenset({STAGE_AXIS}))
    queues = run(grouped, _split_rows(x, micro), _split_rows(positions, micro), _split_rows(segment_ids, micro))
    return _join_rows(queues[0])  # stage 0's queue holds every micro-batch's output
