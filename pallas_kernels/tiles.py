"""Tile-level dots that every kernel body uses: `lax.dot_general` with f32 (or int32) accumulation.

Kept in one place so that the attention and matmul kernels accumulate the same way; the names say
which operand is transposed (`nt`: the second, `tn`: the first), so no kernel materialises a transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def dot(a: jax.Array, b: jax.Array, dims, out=jnp.float32) -> jax.Array:
    """`a` and `b` contracted over `dims` (`((a axes), (b axes))`), accumulated in `out`."""
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=out)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, d] x b [n, d]^T -> [m, n] in f32."""
    return dot(a, b, ((1,), (1,)))


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, n]^T x b [m, d] -> [n, d] in f32."""
    return dot(a, b, ((0,), (0,)))


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, n] x b [n, d] -> [m, d] in f32."""
    return dot(a, b, ((1,), (0,)))
