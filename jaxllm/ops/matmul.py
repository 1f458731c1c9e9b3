"""Projection matmul `x @ w` (or `x @ w.T`) in a chosen compute dtype with f32 accumulation.

With `compute_dtype=bfloat16` the inputs are cast to bf16 and every dot (the forward one and both
backward ones) accumulates in f32. Autodiff alone would not do this: the transposed dots it derives do
not inherit `preferred_element_type`, and bf16-in/bf16-out dots are slow on CPUs and lose precision.
`transpose_w=True` contracts with the weight's second axis (a tied output head `x @ embed.T`) without
materialising the transpose, whose fused form XLA's CPU runtime cannot run with bf16 inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
    return _mixed_fwd(x, w, transpose_w)[0]


def _mixed_fwd(x, w, transpose_w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = _dot(xb, wb, ((x.ndim - 1,), (1 if transpose_w else 0,)))
    # Zero-size arrays carry the input dtypes: residuals must be arrays.
    return out, (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _mixed_bwd(transpose_w, res, g):
    xb, wb, x_like, w_like = res
    gb = g.astype(jnp.bfloat16)
    lead = tuple(range(g.ndim - 1))
    if transpose_w:  # w: [out, in]
        dx = _dot(gb, wb, ((g.ndim - 1,), (0,)))  # [..., out] x [out, in] -> [..., in]
        dw = _dot(gb, xb, (lead, lead))  # [..., out] x [..., in] -> [out, in]
    else:  # w: [in, out]
        dx = _dot(gb, wb, ((g.ndim - 1,), (1,)))  # [..., out] x [in, out] -> [..., in]
        dw = _dot(xb, gb, (lead, lead))  # [..., in] x [..., out] -> [in, out]
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def matmul(
    x: Float[Array, "... d_in"], w: Float[Array, "d_in d_out"], compute_dtype=jnp.float32, transpose_w: bool = False
) -> Float[Array, "... d_out"]:
    """Returns `x @ w` (or `x @ w.T` with `transpose_w`) in f32, computed with `compute_dtype` inputs
    and f32 accumulation."""
    if jnp.dtype(compute_dtype) == jnp.float32:
        w = w.astype(jnp.float32)
        return jnp.dot(x.astype(jnp.float32), w.T if transpose_w else w)
    if jnp.dtype(compute_dtype) != jnp.bfloat16:
        raise ValueError(f"matmul supports float32 and bfloat16 compute, got {compute_dtype}")
    return _mixed_matmul(x, w, transpose_w)
