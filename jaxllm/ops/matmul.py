"""Projection matmul `x @ w` in a chosen compute dtype with f32 accumulation, forward and backward.

With `compute_dtype=bfloat16` the inputs are cast to bf16 and every dot (the forward one and both
backward ones) accumulates in f32. Autodiff alone would not do this: the transposed dots it derives do
not inherit `preferred_element_type`, and bf16-in/bf16-out dots are slow on CPUs and lose precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), ((x.ndim - 1,), (0,)))


def _mixed_fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # Zero-size arrays carry the input dtypes: residuals must be arrays.
    return _dot(xb, wb, ((x.ndim - 1,), (0,))), (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _mixed_bwd(res, g):
    xb, wb, x_like, w_like = res
    gb = g.astype(jnp.bfloat16)
    dx = _dot(gb, wb, ((g.ndim - 1,), (1,)))  # [..., out] x [in, out] -> [..., in]
    lead = tuple(range(g.ndim - 1))
    dw = _dot(xb, gb, (lead, lead))  # [..., in] x [..., out] -> [in, out]
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def matmul(
    x: Float[Array, "... d_in"], w: Float[Array, "d_in d_out"], compute_dtype=jnp.float32
) -> Float[Array, "... d_out"]:
    """Returns `x @ w` in f32, computed with `compute_dtype` inputs and f32 accumulation."""
    if jnp.dtype(compute_dtype) == jnp.float32:
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    if jnp.dtype(compute_dtype) != jnp.bfloat16:
        raise ValueError(f"matmul supports float32 and bfloat16 compute, got {compute_dtype}")
    return _mixed_matmul(x, w)
