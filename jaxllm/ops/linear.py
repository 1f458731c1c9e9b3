"""The models' projection matmuls and embedding lookups, for a plain array or any weight object.

`linear(x, w, compute_dtype, contract=1)` computes `x @ w` with `w` viewed as `[K, N]` (its first
`contract` axes contracted, the result keeping the rest); `embedding_lookup(table, tokens)` gathers
rows. For a plain array they are exactly `jaxllm.ops.matmul.matmul` on that view and a gather from the
whole table. Any other weight implements `Weight` (`matmul` and `lookup`) and is asked to do the work
itself: the compressed weights of `jaxllm.compression.qtensor` quantize the activations, record
calibration ranges and call their kernel there. So the models depend on this protocol, not on a
feature, and a new kind of weight needs no change to any model.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.mesh import constrain
from jaxllm.ops.matmul import matmul


@runtime_checkable
class Weight(Protocol):
    """A weight bound in place of a parameter array; `linear` and `embedding_lookup` defer to it."""

    def matmul(self, x: Float[Array, "... k"], compute_dtype: Any, contract: int,
               transpose_w: bool) -> Float[Array, "... n"]:
        """`x @ self` with the semantics of `linear` (f32 result)."""
        ...

    def lookup(self, tokens: Int[Array, "*dims"]) -> Float[Array, "... d"]:
        """Rows `self[tokens]` of a `[vocab, d]` table, f32."""
        ...


def linear(
    x: Float[Array, "... k"],
    w: Float[Array, "*w_dims"] | Weight,
    compute_dtype: Any = jnp.float32,
    contract: int = 1,
    transpose_w: bool = False,
) -> Float[Array, "... n"]:
    """`x @ w` over `w`'s first `contract` axes (or `x @ w.T` for a 2-D `w` with `transpose_w`), in f32.

    Args:
      x: `[..., K]` activations.
      w: a weight array `[*in, *out]` with `prod(in) = K`, or a `Weight` of that shape.
      compute_dtype: float32 or bfloat16 inputs, f32 accumulation (`jaxllm.ops.matmul.matmul`).
      contract: number of leading `w` axes contracted with `x`'s last axis.
      transpose_w: contract with the second axis of a 2-D `w` (a tied output head `x @ embed.T`).

    Returns:
      `[..., *out]` f32.
    """
    if isinstance(w, Weight):
        return w.matmul(x, compute_dtype, contract, transpose_w)
    if transpose_w:
        return matmul(x, w, compute_dtype, transpose_w=True)
    if w.ndim == 2 and contract == 1:
        return matmul(x, w, compute_dtype)
    k = math.prod(w.shape[:contract])
    return matmul(x, w.reshape(k, -1), compute_dtype).reshape(*x.shape[:-1], *w.shape[contract:])


def embedding_lookup(table: Float[Array, "vocab d"] | Weight, tokens: Int[Array, "*dims"]) -> Float[Array, "... d"]:
    """Rows `table[tokens]` of a plain `[vocab, d]` table (gathered whole, unsharded) or of a `Weight`."""
    if isinstance(table, Weight):
        return table.lookup(tokens)
    # Gather from the whole table: a gather from a vocab-sharded table cannot be partitioned efficiently.
    return jnp.take(constrain(table, (None, None)), tokens, axis=0)

