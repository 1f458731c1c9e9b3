"""The decoder's block weights stacked along a leading slot axis, and the conversions to and from one
entry per block.

A training state may hold `params["blocks"]` as one tree whose leaves are `[slots, ...]` instead of
one tree per block (`{0: ..., 1: ..., ...}`): the scanned decoder then scans the weights as they are,
and pipeline stages own whole blocks, the slot axis being split over the `stage` mesh axis (logical
axis "layers"). Slot `j = (s * R + r) * K + k` holds the `k`-th block of stage `s`'s `r`-th layer group
(`jaxllm.models.pipeline`: S stages, R groups per stage, K slots per group), so each stage's slots are
contiguous; a padded slot holds zeros. Without stages the slots are the blocks in order.

`BlockSlots` is such a layout; `convert_blocks` moves any tree holding decoder blocks (parameters,
optimizer moments) between layouts, which is how checkpoints restore onto another layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.mesh import PipelineSettings
from jaxllm.models.pipeline import active_slots

BLOCKS = "blocks"


class BlockSlots(NamedTuple):
    """Which block each slot of a stacked layout holds (-1: padding)."""

    layer: tuple[int, ...]

    @classmethod
    def of(cls, layers: int, settings: PipelineSettings | None = None) -> BlockSlots:
        """The layout that `settings`' pipeline runs (the blocks in order without stages)."""
        if settings is None or settings.stages == 1:
            return cls(tuple(range(layers)))
        active = active_slots(layers, settings)  # [R, S, K], groups in the order the blocks run
        index = np.where(active, np.cumsum(active.reshape(-1)).reshape(active.shape) - 1, -1)
        return cls(tuple(int(i) for i in index.transpose(1, 0, 2).reshape(-1)))

    @property
    def size(self) -> int:
        return len(self.layer)

    @property
    def active(self) -> np.ndarray:
        return np.asarray(self.layer) >= 0

    def position(self, layer: int) -> int:
        """The slot of block `layer`."""
        return self.layer.index(layer)

    def stack(self, blocks: Sequence[Any]) -> Any:
        """One tree per block (in block order) -> one tree of `[slots, ...]` leaves."""

        def leaf(*per_block):
            zeros = jnp.zeros_like(per_block[0])
            return jnp.stack([per_block[i] if i >= 0 else zeros for i in self.layer])

        return jax.tree.map(leaf, *blocks)

    def unstack(self, stacked: Any) -> dict[int, Any]:
        """The inverse of `stack`: `{block: tree}`."""
        return {layer: jax.tree.map(lambda w, j=j: w[j], stacked) for j, layer in enumerate(self.layer) if layer >= 0}

    def take(self, stacked: Any, source: BlockSlots) -> Any:
        """`stacked`, laid out by `source`, in this layout."""
        if source == self:
            return stacked
        rows = np.asarray([source.position(i) if i >= 0 else 0 for i in self.layer])
        keep = jnp.asarray(self.active)
        return jax.tree.map(lambda w: jnp.where(keep.reshape(-1, *[1] * (w.ndim - 1)), w[rows], 0), stacked)


def is_stacked(blocks: Any) -> bool:
    """Whether a `params["blocks"]` tree is stacked (else keyed by block index, ints or digit strings)."""
    return not all(isinstance(k, int) or str(k).isdigit() for k in blocks)


def stacked_leaf(path: Sequence[Any]) -> bool:
    """Whether the leaf at key `path` of a parameter-like tree is a stacked block weight (its first
    axis counts slots, not a weight dimension)."""
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    return any(k == BLOCKS and i + 1 < len(keys) and not (isinstance(keys[i + 1], int) or str(keys[i + 1]).isdigit())
               for i, k in enumerate(keys))


def _map_blocks(tree: Any, fn: Any) -> Any:
    """`tree` with `fn` applied to every value under a `"blocks"` key, at any depth and through any
    pytree container (Optax states are tuples of named tuples)."""
    has_blocks = lambda x: isinstance(x, Mapping) and BLOCKS in x  # noqa: E731

    def visit(node):
        if not has_blocks(node):
            return node
        return {k: fn(v) if k == BLOCKS else _map_blocks(v, fn) for k, v in node.items()}

    return jax.tree.map(visit, tree, is_leaf=has_blocks)


def convert_blocks(tree: Any, source: BlockSlots | None, target: BlockSlots | None, layers: int) -> Any:
    """Every decoder-blocks subtree of `tree` (under a `"blocks"` key: the parameters and the
    optimizer's mirrors of them) moved from layout `source` to `target` (None: one entry per block)."""
    if source == target:
        return tree

    def move(blocks):
        if not blocks or is_stacked(blocks) != (source is not None):
            return blocks  # not the decoder's (a vision tower's blocks)
        if source is None:
            return target.stack([blocks[i] if i in blocks else blocks[str(i)] for i in range(layers)])
        return source.unstack(blocks) if target is None else target.take(blocks, source)

    return _map_blocks(tree, move)


def abstract_in_layout(tree: Any, layout: BlockSlots | None, current: BlockSlots | None, layers: int) -> Any:
    """`tree` (`ShapeDtypeStruct`s with shardings, decoder blocks in layout `current`) with its
    decoder-blocks subtrees as they are in layout `layout`: what to read a checkpoint saved in that
    layout into before `convert_blocks` moves it. Shardings follow the current ones, less the slot axis
    (a block's weight is then whole on every stage; only for the moment of the conversion)."""
    if layout == current:
        return tree

    def like(a, shape, spec):
        sharding = jax.sharding.NamedSharding(a.sharding.mesh, jax.sharding.PartitionSpec(*spec),
                                              memory_kind=a.sharding.memory_kind)
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=sharding)

    def read_as(blocks):
        if not blocks or is_stacked(blocks) != (current is not None):
            return blocks
        if current is None:
            first = blocks[next(iter(blocks))]
            return jax.tree.map(lambda a: like(a, (layout.size, *a.shape), (None, *a.sharding.spec)), first)
        if layout is None:
            one = jax.tree.map(lambda a: like(a, a.shape[1:], a.sharding.spec[1:]), blocks)
            return {i: one for i in range(layers)}
        return jax.tree.map(lambda a: like(a, (layout.size, *a.shape[1:]), (None, *a.sharding.spec[1:])), blocks)

    return _map_blocks(tree, read_as)
