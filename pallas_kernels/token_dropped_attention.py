"""Attention over the kept tokens of a random-LTD layer as Pallas kernels, forward and backward.

Computes `jaxllm.ops.token_dropped_attention_reference` for every query that sees at least one key:

    O = softmax(Q K^T / sqrt(D) + slope_h * (pos_k - pos_q), masked) V,   Q: [B, r, H, D], K, V: [B, r, KV, D]

where query i sees key j when ``index[j] <= index[i]`` (causal over the tokens' original sequence
indices), both carry the same segment id and the key's segment is not 0 (padding). Queries that see
no key (padding rows) output 0 here, while the reference averages uniformly; the loss never reads
those rows, and their output cotangent is zero in training.

FlashAttention-2 structure (Dao, 2023), one program per (row, head, query block) with an online
softmax in f32; backward in two kernels (dQ per query block, dK/dV per key block) that recompute
``P = exp(S - lse)`` and ``dS = P * (dO V^T - rowsum(dO * O))``. Grouped-query heads read their
key/value head through the BlockSpec index map; dK and dV are produced per query head and summed
over each group outside the kernel. Random-LTD keeps its indices sorted, so key blocks after the
query block are fully masked and skipped: the kernels assume ascending `index` along each row.

The length is padded to a multiple of the block and D to a power of two >= 16 (padded keys are
masked, padded queries get zero cotangents). Side inputs are laid out so every tile's last two
dimensions are either whole or block-sized: queries' ids as `[B, R, 1]`, keys' ids as `[B, 1, R]`.
The calls carry Mosaic TPU or Triton compiler parameters by the platform compiled for
(`pallas_kernels.platforms`); on CPU, or with `interpret=True`, they run in the Pallas interpreter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.errors import UserError
from pallas_kernels.platforms import by_platform, compiler_params
from pallas_kernels.tiles import dot_nn, dot_nt, dot_tn


def _scores(q, k, sq, sk, iq, ik, pq, pk, slope, *, scale, key_start, length, alibi):
    """Masked scores of one [bq, bk] tile in f32 (-inf where the key is not visible or is padding)."""
    s = dot_nt(q, k) * scale
    if alibi:
        s = s + slope * (pk - pq).astype(jnp.float32)
    cols = key_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    visible = (ik <= iq) & (sk == sq) & (sk != 0) & (cols < length)
    return jnp.where(visible, s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, sq_ref, sk_ref, iq_ref, ik_ref, pq_ref, pk_ref, slope_ref, o_ref, lse_ref, *,
                scale, block, length, alibi):
    i = pl.program_id(2)
    q = q_ref[...]
    sq, iq, pq = sq_ref[...], iq_ref[...], pq_ref[...]
    slope = slope_ref[...]
    rows = q.shape[0]
    floor = jnp.finfo(jnp.float32).min

    def body(j, carry):
        m, denom, acc = carry
        cols = pl.ds(pl.multiple_of(j * block, block), block)
        k, v = k_ref[cols, :], v_ref[cols, :]
        s = _scores(q, k, sq, sk_ref[:, cols], iq, ik_ref[:, cols], pq, pk_ref[:, cols], slope, scale=scale,
                    key_start=j * block, length=length, alibi=alibi)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m - m_new)
        denom = denom * correction + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * correction + dot_nn(p.astype(v.dtype), v)
        return m_new, denom, acc

    init = (jnp.full((rows, 1), floor, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, denom, acc = lax.fori_loop(0, i + 1, body, init)
    seen = denom > 0
    o_ref[...] = jnp.where(seen, acc / jnp.where(seen, denom, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sq_ref, sk_ref, iq_ref, ik_ref, pq_ref, pk_ref,
               slope_ref, dq_ref, *, scale, block, length, alibi):
    i = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    sq, iq, pq, slope = sq_ref[...], iq_ref[...], pq_ref[...], slope_ref[...]

    def body(j, dq):
        cols = pl.ds(pl.multiple_of(j * block, block), block)
        k, v = k_ref[cols, :], v_ref[cols, :]
        s = _scores(q, k, sq, sk_ref[:, cols], iq, ik_ref[:, cols], pq, pk_ref[:, cols], slope, scale=scale,
                    key_start=j * block, length=length, alibi=alibi)
        p = jnp.exp(s - lse)
        ds = p * (dot_nt(do, v) - delta)
        return dq + dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, i + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sq_ref, sk_ref, iq_ref, ik_ref, pq_ref, pk_ref,
                slope_ref, dk_ref, dv_ref, *, scale, block, length, alibi, blocks):
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    sk, ik, pk, slope = sk_ref[...], ik_ref[...], pk_ref[...], slope_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * block, block), block)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _scores(q, k, sq_ref[rows, :], sk, iq_ref[rows, :], ik, pq_ref[rows, :], pk, slope, scale=scale,
                    key_start=j * block, length=length, alibi=alibi)
        p = jnp.exp(s - lse_ref[rows, :])
        dv = dv + dot_tn(p.astype(do.dtype), do)
        ds = p * (dot_nt(do, v) - delta_ref[rows, :])
        dk = dk + dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(j, blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers on the [B, H, R, D] layout.

def _specs(groups, block, padded, dim, *, along_keys):
    """BlockSpecs of (q-like tile or whole, k/v tile or whole, ids...), for a (b, h, block) grid."""

    def tile(kv):
        head = (lambda h: h // groups) if kv else (lambda h: h)
        return pl.BlockSpec((None, None, block, dim), lambda b, h, t: (b, head(h), t, 0))

    def whole(kv):
        head = (lambda h: h // groups) if kv else (lambda h: h)
        return pl.BlockSpec((None, None, padded, dim), lambda b, h, t: (b, head(h), 0, 0))

    col_tile = pl.BlockSpec((None, block, 1), lambda b, h, t: (b, t, 0))
    col_whole = pl.BlockSpec((None, padded, 1), lambda b, h, t: (b, 0, 0))
    row_tile = pl.BlockSpec((None, 1, block), lambda b, h, t: (b, 0, t))
    row_whole = pl.BlockSpec((None, 1, padded), lambda b, h, t: (b, 0, 0))
    stat_tile = pl.BlockSpec((None, None, block, 1), lambda b, h, t: (b, h, t, 0))
    stat_whole = pl.BlockSpec((None, None, padded, 1), lambda b, h, t: (b, h, 0, 0))
    slope = pl.BlockSpec((None, 1, block), lambda b, h, t: (h, 0, 0))
    if along_keys:
        return dict(q=whole(False), kv=tile(True), stat=stat_whole, col=col_whole, row=row_tile, slope=slope)
    return dict(q=tile(False), kv=whole(True), stat=stat_tile, col=col_tile, row=row_whole, slope=slope)


def _layout(q, k, block):
    batch, length, heads, dim = q.shape
    groups = heads // k.shape[2]
    padded = -(-length // block) * block
    padded_dim = max(16, pl.next_power_of_2(dim))
    return batch, length, heads, dim, groups, padded, padded_dim


def _prepare(q, k, v, segment_ids, positions, token_index, slopes, block):
    batch, length, heads, dim, groups, padded, pdim = _layout(q, k, block)

    def heads_major(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, pdim - dim)))

    def ids(x):
        x = jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded - length)))
        return x[:, :, None], x[:, None, :]

    slope = jnp.broadcast_to(slopes.astype(jnp.float32)[:, None, None], (heads, 1, block))
    return heads_major(q), heads_major(k), heads_major(v), ids(segment_ids), ids(token_index), ids(positions), slope


def _cost(qt, block, matmuls, tensors):
    """What one call computes, for XLA's cost analysis (a kernel is opaque to it): `matmuls` [block,
    block, D] products per visited tile pair (each query block meets the key blocks up to its own,
    n (n + 1) / 2 pairs of n blocks), an exp per score, and `tensors` q-sized arrays read or written."""
    batch, heads, padded, pdim = qt.shape
    blocks = padded // block
    pairs = batch * heads * blocks * (blocks + 1) // 2
    return pl.CostEstimate(flops=2 * matmuls * pairs * block * block * pdim, transcendentals=pairs * block * block,
                           bytes_accessed=tensors * qt.size * qt.dtype.itemsize)


def _forward(qt, kt, vt, seg, idx, pos, slope, *, scale, block, length, alibi, backend):
    batch, heads, padded, pdim = qt.shape
    groups = heads // kt.shape[1]
    sp = _specs(groups, block, padded, pdim, along_keys=False)
    kernel = functools.partial(_fwd_kernel, scale=scale, block=block, length=length, alibi=alibi)
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, padded // block),
        in_specs=[sp["q"], sp["kv"], sp["kv"], sp["col"], sp["row"], sp["col"], sp["row"], sp["col"], sp["row"],
                  sp["slope"]],
        out_specs=[sp["q"], sp["stat"]],
        out_shape=[jax.ShapeDtypeStruct(qt.shape, qt.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded, 1), jnp.float32)],
        compiler_params=compiler_params(backend, parallel_axes=3),
        cost_estimate=_cost(qt, block, matmuls=2, tensors=4),  # S = Q K^T, P V; q, k, v, o
        interpret=backend == "interpret",
    )(qt, kt, vt, seg[0], seg[1], idx[0], idx[1], pos[0], pos[1], slope)


def _backward(qt, kt, vt, ot, lse, dot, seg, idx, pos, slope, *, scale, block, length, alibi, backend):
    batch, heads, padded, pdim = qt.shape
    groups = heads // kt.shape[1]
    delta = jnp.sum(ot.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1, keepdims=True)
    ids = (seg[0], seg[1], idx[0], idx[1], pos[0], pos[1], slope)
    common = dict(scale=scale, block=block, length=length, alibi=alibi)
    sq = _specs(groups, block, padded, pdim, along_keys=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(batch, heads, padded // block),
        in_specs=[sq["q"], sq["kv"], sq["kv"], sq["q"], sq["stat"], sq["stat"], sq["col"], sq["row"], sq["col"],
                  sq["row"], sq["col"], sq["row"], sq["slope"]],
        out_specs=sq["q"],
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        compiler_params=compiler_params(backend, parallel_axes=3),
        cost_estimate=_cost(qt, block, matmuls=3, tensors=5),  # S, dO V^T, dS K; q, k, v, dO, dQ
        interpret=backend == "interpret",
    )(qt, kt, vt, dot, lse, delta, *ids)
    sk = _specs(groups, block, padded, pdim, along_keys=True)
    per_head = pl.BlockSpec((None, None, block, pdim), lambda b, h, t: (b, h, t, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common, blocks=padded // block),
        grid=(batch, heads, padded // block),
        in_specs=[sk["q"], sk["kv"], sk["kv"], sk["q"], sk["stat"], sk["stat"], sk["col"], sk["row"], sk["col"],
                  sk["row"], sk["col"], sk["row"], sk["slope"]],
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, padded, pdim), jnp.float32)] * 2,
        compiler_params=compiler_params(backend, parallel_axes=3),
        cost_estimate=_cost(qt, block, matmuls=4, tensors=6),  # S, P^T dO, dO V^T, dS^T Q; + dK, dV
        interpret=backend == "interpret",
    )(qt, kt, vt, dot, lse, delta, *ids)
    kv_heads = kt.shape[1]
    dk = dk.reshape(batch, kv_heads, groups, padded, pdim).sum(2)
    dv = dv.reshape(batch, kv_heads, groups, padded, pdim).sum(2)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# custom_vjp entry point on the model layout [B, r, H, D].

@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, segment_ids, positions, token_index, slopes, block, alibi, backend):
    return _attention_fwd(q, k, v, segment_ids, positions, token_index, slopes, block, alibi, backend)[0]


def _attention_fwd(q, k, v, segment_ids, positions, token_index, slopes, block, alibi, backend):
    length, dim = q.shape[1], q.shape[3]
    qt, kt, vt, seg, idx, pos, slope = _prepare(q, k, v, segment_ids, positions, token_index, slopes, block)
    ot, lse = _forward(qt, kt, vt, seg, idx, pos, slope, scale=1.0 / math.sqrt(dim), block=block, length=length,
                       alibi=alibi, backend=backend)
    out = jnp.swapaxes(ot[:, :, :length, :dim], 1, 2)
    return out, (q, k, v, segment_ids, positions, token_index, slopes, ot, lse)


def _attention_bwd(block, alibi, backend, residuals, g):
    q, k, v, segment_ids, positions, token_index, slopes, ot, lse = residuals
    length, dim = q.shape[1], q.shape[3]
    qt, kt, vt, seg, idx, pos, slope = _prepare(q, k, v, segment_ids, positions, token_index, slopes, block)
    dot = _prepare(g.astype(q.dtype), k, v, segment_ids, positions, token_index, slopes, block)[0]
    dq, dk, dv = _backward(qt, kt, vt, ot, lse, dot, seg, idx, pos, slope, scale=1.0 / math.sqrt(dim), block=block,
                           length=length, alibi=alibi, backend=backend)

    def back(x, like):
        return jnp.swapaxes(x[:, :, :length, :dim], 1, 2).astype(like.dtype)

    return back(dq, q), back(dk, k), back(dv, v), None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def token_dropped_attention(q, k, v, segment_ids, positions, token_index, alibi=None, *, block=None,
                            interpret=False, backend=None):
    """Pallas attention over kept tokens; same contract as `jaxllm.ops.token_dropped_attention`.

    Args:
      q: `[B, r, H, D]`; k, v: `[B, r, KV, D]` with KV dividing H; one floating dtype (the compute
        dtype: dots accumulate in f32, the softmax is f32).
      segment_ids, positions, token_index: `[B, r]` int; `token_index` ascending along each row.
      alibi: `[H]` slopes or None.
      block: tile size along r, a power of two >= 16 (default 64 on GPU and in the interpreter, 128 on
        TPU, where smaller blocks grow to 128; the padded length when that is shorter).
      interpret: run with the Pallas interpreter on every platform (slow); otherwise the backend
        follows the platform compiled for (`pallas_kernels.platforms`).
      backend: force one variant on every platform ("mosaic_tpu", "triton" or "interpret"; see
        `pallas_kernels.platforms.by_platform`).
    """
    batch, length, heads, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, length) or heads % k.shape[2] or k.shape[3] != dim:
        raise UserError(f"token_dropped_attention: q {q.shape}, k {k.shape}, v {v.shape}; expected q [B, r, H, D] "
                        "and k, v [B, r, KV, D] with KV dividing H")
    if block is not None and (block < 16 or block & (block - 1)):
        raise UserError(f"token_dropped_attention (pallas): block must be a power of two >= 16, got {block}")
    slopes = jnp.zeros((heads,), jnp.float32) if alibi is None else jnp.asarray(alibi, jnp.float32)
    return by_platform(_attention_for, q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
                       token_index.astype(jnp.int32), slopes, interpret=interpret, backend=backend, block=block,
                       alibi=alibi is not None)


def _block_for(backend: str, block: int | None, length: int) -> int:
    """The tile size along r. Mosaic TPU needs the key ids' lane-dimension tiles `[1, block]` to be
    multiples of 128 or the whole padded length, so a TPU block below 128 grows to 128 (or to the
    length when that is shorter); Triton and the interpreter take any power of two >= 16."""
    whole = max(16, pl.next_power_of_2(length))
    if backend == "mosaic_tpu":
        return min(max(block or 128, 128), whole)
    return block or min(64, whole)


def _attention_for(q, k, v, segment_ids, positions, token_index, slopes, *, backend, block, alibi):
    return _attention(q, k, v, segment_ids, positions, token_index, slopes, _block_for(backend, block, q.shape[1]),
                      alibi, backend)
