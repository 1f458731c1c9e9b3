"""Evoformer attention with additive biases: DeepSpeed4Science's `DS4Sci_EvoformerAttention` in JAX.

    O = softmax(Q K^T / sqrt(D) + sum_i bias_i) V        (softmax over keys, in f32)

with `Q, K, V` shaped `[B, N, L, H, D]` (batch, sequences or rows, length, heads, head dim) and each
bias broadcastable to the scores `[B, N, H, Lq, Lk]`. AlphaFold 2 (Jumper et al., 2021, Algorithms 7,
8, 13, 14) uses two: a key mask `[B, N, 1, 1, L]` (DeepSpeed's `1e9 * (mask - 1)`) and a pair bias
`[B, 1, H, L, L]` shared by all rows.

`evoformer_attention_reference` is the definition: it materialises every score in f32. The XLA
implementation of `evoformer_attention` never does: it visits `[block_q, block_k]` tiles of the score
matrix with an online softmax (Milakov & Gimelshein, 2018; Rabe & Staats, 2021, "Self-attention does
not need O(n^2) memory"; Dao et al., 2022, FlashAttention), keeping only a running max `m`,
normaliser `l` and output accumulator per query, and saves the log-sum-exp `m + log l` for the
backward pass, which recomputes the probabilities one tile at a time. Temporary memory is therefore a
few `[B, N, H, block_q, block_k]` tiles plus `O(B N L H D)` accumulators instead of several
`[B, N, H, Lq, Lk]` arrays, for any L and D (DeepSpeed's CUDA kernel needs L > 16 and, backward,
D <= 64). Lengths that the blocks do not divide need no padding: the last block is shifted back to
end at L and the positions it shares with its predecessor are masked.

Gradients (a `custom_vjp`): with `P` the probabilities, `dP = dO V^T` and `delta = rowsum(dO * O)`,
`dS = P * (dP - delta)`; then `dQ = dS K / sqrt(D)`, `dK = dS^T Q / sqrt(D)`, `dV = P^T dO`, and each
bias gets `dS` summed over the axes it is broadcast along, so a `[B, N, 1, 1, L]` mask gets a
`[B, N, 1, 1, L]` gradient and a `[B, 1, H, L, L]` pair bias a `[B, 1, H, L, L]` one.

Fully masked rows. A query whose every score is `-inf` (all keys masked with `-inf`) has no softmax;
here it outputs zeros and passes zero, finite gradients to everything. With DeepSpeed's finite mask
(`-1e9`), such a row is the ordinary softmax of near-equal scores, exactly as in DeepSpeed and the
reference; the two definitions agree wherever at least one key is visible.

Precision: inputs keep their dtype (f32 or bf16) in every dot, dots accumulate in f32, the softmax
and the accumulators are f32, and the results are cast back to the input dtypes.

Example:
    >>> B, N, L, H, D = 1, 4, 32, 2, 8
    >>> q = k = v = jnp.ones((B, N, L, H, D))
    >>> mask = jnp.zeros((B, N, 1, 1, L)); pair = jnp.zeros((B, 1, H, L, L))
    >>> evoformer_attention(q, k, v, [mask, pair]).shape
    (1, 4, 32, 2, 8)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxllm.errors import UserError
from jaxllm.ops.dispatch import dispatch, kernel_mesh, logical_spec, pallas_selected, shard_kernel
from pallas_kernels.evoformer_inputs import check_inputs

DEFAULT_BLOCK = 128


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------
# The definition.


def evoformer_attention_reference(
    q: Float[Array, "b n lq h d"],
    k: Float[Array, "b n lk h d"],
    v: Float[Array, "b n lk h d"],
    biases: Sequence[Float[Array, "_b _n _h _lq _lk"] | None] = (),
    scale: float | None = None,
) -> Float[Array, "b n lq h d"]:
    """softmax(q k^T * scale + sum(biases)) v, materialising all `[B, N, H, Lq, Lk]` scores in f32.

    `scale` defaults to 1 / sqrt(D). Rows whose scores are all `-inf` output zeros (see the module
    docstring). Differentiable with plain autodiff; the ground truth for every other implementation.
    """
    biases = check_inputs(q, k, v, biases)
    scores = jnp.einsum("bnqhd,bnkhd->bnhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * _scale(q, scale)
    for bias in biases:
        scores = scores + bias.astype(jnp.float32)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(peak == -jnp.inf, 0.0, peak))
    weights = jnp.exp(scores - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total == 0.0, 1.0, total)
    return jnp.einsum("bnhqk,bnkhd->bnqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# Memory-efficient XLA implementation.


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering `length`; the last block is shifted to end at `length`."""
    block = min(block, length)
    return block, -(-length // block)


def _start(i, block: int, length: int):
    """Start of block i. A shifted last block overlaps its predecessor; rows below `i * block` are stale."""
    return jnp.minimum(i * block, length - block)


def _fresh(i, start, block: int, length: int):
    """[block] bool: positions of block i not covered by an earlier block (all True unless shifted)."""
    if length % block == 0:
        return None
    return start + jnp.arange(block) >= i * block


def _loop(count: int, body, init):
    """`fori_loop` over blocks; a single block is traced inline (cheaper to compile, same result)."""
    return body(0, init) if count == 1 else jax.lax.fori_loop(0, count, body, init)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _add_block(acc, update, start, axis):
    current = _slice(acc, start, update.shape[axis], axis)
    return jax.lax.dynamic_update_slice_in_dim(acc, current + update, start, axis=axis)


def _add_tile(acc, tile, qs, ks):
    """acc[..., qs:qs+bq, ks:ks+bk] += tile, for a bias-shaped accumulator (size-1 axes stay at 0)."""
    zero = jnp.zeros((), jnp.int32)
    starts = (zero, zero, zero, qs if acc.shape[3] != 1 else zero, ks if acc.shape[4] != 1 else zero)
    current = jax.lax.dynamic_slice(acc, starts, tile.shape)
    return jax.lax.dynamic_update_slice(acc, current + tile, starts)


def _tile_scores(qb, kb, biases, qs, ks, tile, scale):
    """Scores of one tile [B, N, H, bq, bk] in f32: q block at rows qs, key block at ks."""
    bq, bk = tile
    s = _dot("bnqhd,bnkhd->bnhqk", qb, kb) * scale
    for bias in biases:
        if bias.shape[3] != 1:
            bias = _slice(bias, qs, bq, 3)
        if bias.shape[4] != 1:
            bias = _slice(bias, ks, bk, 4)
        s = s + bias.astype(jnp.float32)
    return s


def _xla_forward(q, k, v, biases, scale, block_q, block_k):
    """Returns the output [B, N, Lq, H, D] and the log-sum-exp [B, N, H, Lq] (f32; +inf for empty rows).

    Outer loop over query blocks, inner loop over key blocks; only one [B, N, H, bq, bk] tile of scores
    exists at a time. A shifted last query block recomputes a few rows and writes the same values.
    """
    b, n, lq, h, d = q.shape
    lk = k.shape[2]
    bq, q_blocks = _blocks(lq, block_q)
    bk, k_blocks = _blocks(lk, block_k)

    def query_block(i, carry):
        out, lse = carry
        qs = _start(i, bq, lq)
        qb = _slice(q, qs, bq, 2)

        def key_block(j, inner):
            m_prev, l_prev, acc = inner
            ks = _start(j, bk, lk)
            s = _tile_scores(qb, _slice(k, ks, bk, 2), biases, qs, ks, (bq, bk), scale)
            fresh = _fresh(j, ks, bk, lk)
            if fresh is not None:
                s = jnp.where(fresh, s, -jnp.inf)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: avoid (-inf) - (-inf)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m_prev - m_safe)
            pv = _dot("bnhqk,bnkhd->bnhqd", p.astype(v.dtype), _slice(v, ks, bk, 2))
            return m_new, l_prev * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

        stats = (b, n, h, bq)
        init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros((b, n, h, bq, d), jnp.float32))
        m, denom, acc = _loop(k_blocks, key_block, init)
        empty = denom == 0.0
        ob = (acc / jnp.where(empty, 1.0, denom)[..., None]).transpose(0, 1, 3, 2, 4).astype(q.dtype)
        lse_b = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, denom)))
        out = jax.lax.dynamic_update_slice_in_dim(out, ob, qs, axis=2)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, lse_b, qs, axis=3)

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, n, h, lq), jnp.float32))
    return _loop(q_blocks, query_block, init)


def _xla_backward(q, k, v, biases, out, lse, do, scale, block_q, block_k):
    """Gradients for q, k, v and every bias, recomputing the probabilities one tile at a time.

    Outer loop over key blocks (accumulating dK, dV), inner loop over query blocks (accumulating dQ
    and the bias gradients by adding tiles). Stale rows and keys of shifted last blocks get P = 0.
    """
    lq, lk = q.shape[2], k.shape[2]
    bq, q_blocks = _blocks(lq, block_q)
    bk, k_blocks = _blocks(lk, block_k)
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 1, 3, 2)  # [B,N,H,Lq]

    def key_block(j, carry):
        ks = _start(j, bk, lk)
        kb, vb = _slice(k, ks, bk, 2), _slice(v, ks, bk, 2)
        key_fresh = _fresh(j, ks, bk, lk)

        def query_block(i, inner):
            dq, dk_j, dv_j, dbiases = inner
            qs = _start(i, bq, lq)
            qb, dob = _slice(q, qs, bq, 2), _slice(do, qs, bq, 2)
            s = _tile_scores(qb, kb, biases, qs, ks, (bq, bk), scale)
            p = jnp.exp(s - _slice(lse, qs, bq, 3)[..., None])  # 0 for -inf scores and empty rows (lse = +inf)
            query_fresh = _fresh(i, qs, bq, lq)
            if key_fresh is not None:
                p = jnp.where(key_fresh, p, 0.0)
            if query_fresh is not None:
                p = jnp.where(query_fresh[:, None], p, 0.0)
            dp = _dot("bnqhd,bnkhd->bnhqk", dob, vb)
            ds = p * (dp - _slice(delta, qs, bq, 3)[..., None])
            dsc = ds.astype(q.dtype)
            dq = _add_block(dq, _dot("bnhqk,bnkhd->bnqhd", dsc, kb) * scale, qs, 2)
            dk_j = dk_j + _dot("bnhqk,bnqhd->bnkhd", dsc, qb) * scale
            dv_j = dv_j + _dot("bnhqk,bnqhd->bnkhd", p.astype(v.dtype), dob)
            new = []
            for bias, acc in zip(biases, dbiases, strict=True):
                g = jnp.sum(ds, axis=tuple(a for a in range(5) if bias.shape[a] == 1), keepdims=True)
                new.append(_add_tile(acc, g, qs, ks))
            return dq, dk_j, dv_j, tuple(new)

        dq, dk, dv, dbiases = carry
        zeros = jnp.zeros(kb.shape, jnp.float32)
        dq, dk_j, dv_j, dbiases = _loop(q_blocks, query_block, (dq, zeros, zeros, dbiases))
        return dq, _add_block(dk, dk_j, ks, 2), _add_block(dv, dv_j, ks, 2), dbiases

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
            tuple(jnp.zeros(bias.shape, jnp.float32) for bias in biases))
    dq, dk, dv, dbiases = _loop(k_blocks, key_block, init)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            tuple(g.astype(bias.dtype) for g, bias in zip(dbiases, biases, strict=True)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _xla_attention(q, k, v, biases, scale, block_q, block_k):
    return _xla_forward(q, k, v, biases, scale, block_q, block_k)[0]


def _xla_attention_fwd(q, k, v, biases, scale, block_q, block_k):
    out, lse = _xla_forward(q, k, v, biases, scale, block_q, block_k)
    return out, (q, k, v, biases, out, lse)


def _xla_attention_bwd(scale, block_q, block_k, residuals, do):
    q, k, v, biases, out, lse = residuals
    return _xla_backward(q, k, v, biases, out, lse, do, scale, block_q, block_k)


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


# ----------------------------------------------------------------------------------------------------
# Public op.


def pallas_supported(platform: str | None = None) -> bool:
    """Whether "auto" picks the Pallas kernel on `platform` (default: JAX's default backend): on GPU
    (Triton) and TPU (Mosaic); on CPU, which has only the Pallas interpreter, the XLA implementation."""
    return pallas_selected("evoformer_attention", "auto", platform)


def _pallas_attention(q, k, v, biases, scale):
    """The kernel, under a mesh on each device's rows of B and its heads."""
    from pallas_kernels.evoformer_attention import evoformer_attention as kernel

    def run(q, k, v, biases):
        return kernel(q, k, v, biases, scale=scale)

    mesh = kernel_mesh()
    if mesh is None:
        return run(q, k, v, biases)
    qkv = lambda x: logical_spec(mesh, ("batch", None, None, "heads", None), x.shape)  # noqa: E731
    scores = lambda x: logical_spec(mesh, ("batch", None, "heads", None, None), x.shape)  # noqa: E731
    specs = (qkv(q), qkv(k), qkv(v), tuple(scores(b) for b in biases))
    return shard_kernel(run, mesh, specs, qkv(q))(q, k, v, biases)


def evoformer_attention(
    q: Float[Array, "b n lq h d"],
    k: Float[Array, "b n lk h d"],
    v: Float[Array, "b n lk h d"],
    biases: Sequence[Float[Array, "_b _n _h _lq _lk"] | None] = (),
    *,
    scale: float | None = None,
    implementation: str = "auto",
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> Float[Array, "b n lq h d"]:
    """Memory-efficient `softmax(q k^T / sqrt(D) + sum(biases)) v` with DeepSpeed's shapes.

    Args:
      q, k, v: `[B, N, L, H, D]` (k and v may have their own length Lk), one floating dtype.
      biases: any number of rank-5 arrays (DeepSpeed allows two), each broadcastable to
        `[B, N, H, Lq, Lk]` and of q's dtype; `None` entries are ignored. All are differentiable.
      scale: score scale, default `1 / sqrt(D)`.
      implementation: "xla" (tiled online softmax, any platform), "pallas" (the kernels in
        `pallas_kernels/evoformer_attention.py`: Triton on GPU, Mosaic on TPU, interpreted on CPU) or
        "auto" (Pallas when compiled for a GPU or TPU, XLA for CPU).
      block_q, block_k: query and key tile sizes of the XLA implementation; its temporary memory
        holds a few `[B, N, H, block_q, block_k]` f32 tiles besides the `O(L D)` accumulators.

    Returns:
      `[B, N, Lq, H, D]` in q's dtype.
    """
    if int(block_q) < 1 or int(block_k) < 1:
        raise UserError(f"evoformer_attention: block_q and block_k must be positive, got {block_q}, {block_k}")
    biases = check_inputs(q, k, v, biases)
    scale = _scale(q, scale)
    return dispatch("evoformer_attention", implementation, functools.partial(_pallas_attention, scale=scale),
                    lambda q, k, v, biases: _xla_attention(q, k, v, biases, scale, int(block_q), int(block_k)),
                    q, k, v, biases)
