"""Evoformer attention as Pallas kernels (Triton GPU backend), forward and backward.

Computes the same function as `jaxllm.ops.evoformer_attention_reference`:

    O = softmax(Q K^T * scale + sum_t bias_t) V,   Q, K, V: [B, N, L, H, D],  bias_t -> [B, N, H, Lq, Lk]

Four kernels, each one program per tile, with an online softmax in f32 (FlashAttention-2, Dao 2023):

* forward, grid (B, N, H, query blocks): streams key blocks, writes O and the log-sum-exp
  `lse = m + log l` (+inf for a row whose scores are all -inf; such a row outputs 0);
* dQ, grid (B, N, H, query blocks), and dK/dV, grid (B, N, H, key blocks): recompute
  `P = exp(S - lse)`, `dS = P * (dO V^T - rowsum(dO * O))`;
* one bias-gradient kernel per bias, gridded over that bias's own (non-broadcast) axes, which loops
  over the axes the bias is broadcast along and accumulates `dS` in f32, so a pair bias
  `[B, 1, H, L, L]` gets its sum over N without any `[B, N, H, L, L]` array existing.

Lengths are padded to a multiple of the block sizes and D to a power of two >= 16 (Triton's
`tl.dot` needs power-of-two tiles of at least 16); padded keys are masked with -inf, padded queries
carry zero `dO` and so contribute nothing to any gradient. Broadcasting is done by the BlockSpec index
maps: a bias axis of size 1 always maps to block 0, so no bias is ever expanded.

Every kernel uses only `pl.program_id`, ref slicing with `pl.ds`, `lax.dot_general` with f32
accumulation, `lax.fori_loop` and element-wise `jnp`; the pallas calls pass Triton compiler params,
so on a GPU they lower through the Triton backend. With `interpret=True` they run on any backend
(the tests run them on CPU). Importing this module needs no GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.errors import UserError
from pallas_kernels.evoformer_inputs import check_inputs
from pallas_kernels.tiles import dot_nn, dot_nt, dot_tn

NEG_INF = -jnp.inf


def _pow2_at_least_16(n: int) -> int:
    return max(16, pl.next_power_of_2(n))


class _Layout:
    """Static sizes shared by the kernels of one call."""

    def __init__(self, q, k, biases, block_q, block_k):
        self.batch, self.rows, self.length_q, self.heads, self.dim = q.shape
        self.length_k = k.shape[2]
        self.block_q, self.block_k = block_q, block_k
        self.padded_q = -(-self.length_q // block_q) * block_q
        self.padded_k = -(-self.length_k // block_k) * block_k
        self.padded_d = _pow2_at_least_16(self.dim)
        # Per bias: which of (B, N, H, Lq, Lk) it spans (True) or is broadcast along (False).
        self.spans = tuple(tuple(s != 1 for s in b.shape) for b in biases)

    @property
    def q_blocks(self):
        return self.padded_q // self.block_q

    @property
    def k_blocks(self):
        return self.padded_k // self.block_k

    @property
    def key_padding(self):
        return self.padded_k != self.length_k


def _bias_tile(ref, spans, rows, cols, lead=()):
    """Loads the [rows or 1, cols or 1] part of a bias ref; `rows`/`cols` are pl.ds or None (all).

    `lead` indexes the (B, N, H) axes when the ref holds the whole bias (one indexer: Triton needs that).
    """
    r = rows if (spans[3] and rows is not None) else slice(None)
    c = cols if (spans[4] and cols is not None) else slice(None)
    return ref[(*lead, r, c)].astype(jnp.float32)


def _scores(q, k, bias_tiles, scale, key_start, layout):
    """[bq, bk] f32 scores of one tile, padded keys at -inf."""
    s = dot_nt(q, k) * scale
    for tile in bias_tiles:
        s = s + tile
    if layout.key_padding:
        keys = key_start + lax.broadcasted_iota(jnp.int32, (1, k.shape[0]), 1)
        s = jnp.where(keys < layout.length_k, s, NEG_INF)
    return s


# ----------------------------------------------------------------------------------------------------
# Forward.


def _forward_kernel(q_ref, k_ref, v_ref, *refs, scale, layout):
    *bias_refs, o_ref, lse_ref = refs
    bq, bk = layout.block_q, layout.block_k
    q = q_ref[...]

    def body(j, carry):
        m_prev, l_prev, acc = carry
        cols = pl.ds(j * bk, bk)
        tiles = [_bias_tile(r, sp, None, cols) for r, sp in zip(bias_refs, layout.spans, strict=True)]
        s = _scores(q, k_ref[cols, :], tiles, scale, j * bk, layout)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        correction = jnp.exp(m_prev - m_safe)
        v = v_ref[cols, :]
        acc = acc * correction[:, None] + dot_nn(p.astype(v.dtype), v)
        return m_new, l_prev * correction + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, layout.padded_d), jnp.float32))
    m, denom, acc = lax.fori_loop(0, layout.k_blocks, body, init)
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(safe))


# ----------------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, layout):
    *bias_refs, dq_ref = refs
    bk = layout.block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        cols = pl.ds(j * bk, bk)
        tiles = [_bias_tile(r, sp, None, cols) for r, sp in zip(bias_refs, layout.spans, strict=True)]
        k = k_ref[cols, :]
        p = jnp.exp(_scores(q, k, tiles, scale, j * bk, layout) - lse[:, None])
        ds = p * (dot_nt(do, v_ref[cols, :]) - delta[:, None])
        return dq + dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, layout.k_blocks, body, jnp.zeros((layout.block_q, layout.padded_d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, layout):
    *bias_refs, dk_ref, dv_ref = refs
    bq = layout.block_q
    key_start = pl.program_id(3) * layout.block_k
    k, v = k_ref[...], v_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        tiles = [_bias_tile(r, sp, rows, None) for r, sp in zip(bias_refs, layout.spans, strict=True)]
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = jnp.exp(_scores(q, k, tiles, scale, key_start, layout) - lse_ref[rows][:, None])
        ds = p * (dot_nt(do, v) - delta_ref[rows][:, None])
        return dk + dot_tn(ds.astype(q.dtype), q), dv + dot_tn(p.astype(do.dtype), do)

    zeros = jnp.zeros((layout.block_k, layout.padded_d), jnp.float32)
    dk, dv = lax.fori_loop(0, layout.q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dbias_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, layout, which):
    """Gradient tile of bias `which`: sums dS over every index that bias is broadcast along."""
    *bias_refs, db_ref = refs
    bq, bk = layout.block_q, layout.block_k
    spans = layout.spans[which]
    extents = (layout.batch, layout.rows, layout.heads, layout.q_blocks, layout.k_blocks)
    # Loop over the product of the broadcast axes; the spanned ones come from the grid.
    looped = [a for a in range(5) if not spans[a]]
    count = math.prod(extents[a] for a in looped)
    pids = [pl.program_id(a) for a in range(5)]

    def body(t, acc):
        index = list(pids)
        for a in reversed(looped):
            index[a] = lax.rem(t, extents[a])  # t >= 0: truncating ops, which Triton lowers directly
            t = lax.div(t, extents[a])
        b, n, h, i, j = index
        rows, cols = pl.ds(i * bq, bq), pl.ds(j * bk, bk)
        tiles = []
        for ref, sp in zip(bias_refs, layout.spans, strict=True):
            lead = tuple(x if s else 0 for x, s in zip((b, n, h), sp[:3], strict=True))
            tiles.append(_bias_tile(ref, sp, rows, cols, lead))
        q, do = q_ref[b, n, rows, h, :], do_ref[b, n, rows, h, :]
        k, v = k_ref[b, n, cols, h, :], v_ref[b, n, cols, h, :]
        p = jnp.exp(_scores(q, k, tiles, scale, j * bk, layout) - lse_ref[b, n, h, rows][:, None])
        ds = p * (dot_nt(do, v) - delta_ref[b, n, h, rows][:, None])
        if not spans[3]:
            ds = jnp.sum(ds, axis=0, keepdims=True)
        if not spans[4]:
            ds = jnp.sum(ds, axis=1, keepdims=True)
        return acc + ds

    shape = (bq if spans[3] else 1, bk if spans[4] else 1)
    db_ref[...] = lax.fori_loop(0, count, body, jnp.zeros(shape, jnp.float32)).astype(db_ref.dtype)


# ----------------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _qkv_spec(layout, block, along_k):
    """Block of a [B, N, Lp, H, Dp] array: one (b, n, h) and either one block or the whole length."""
    if block is None:
        return pl.BlockSpec((None, None, layout.padded_k if along_k else layout.padded_q, None, layout.padded_d),
                            lambda b, n, h, i: (b, n, 0, h, 0))
    return pl.BlockSpec((None, None, block, None, layout.padded_d), lambda b, n, h, i: (b, n, i, h, 0))


def _row_spec(layout, whole):
    """Block of a [B, N, H, Lqp] f32 array (lse, delta)."""
    if whole:
        return pl.BlockSpec((None, None, None, layout.padded_q), lambda b, n, h, i: (b, n, h, 0))
    return pl.BlockSpec((None, None, None, layout.block_q), lambda b, n, h, i: (b, n, h, i))


def _bias_spec(layout, spans, grid_along_k):
    """Block of a padded bias for a (b, n, h, block) grid: broadcast axes always read block 0."""
    rows = (layout.block_q if not grid_along_k else layout.padded_q) if spans[3] else 1
    cols = (layout.block_k if grid_along_k else layout.padded_k) if spans[4] else 1

    def index(b, n, h, i):
        return (b if spans[0] else 0, n if spans[1] else 0, h if spans[2] else 0,
                i if (spans[3] and not grid_along_k) else 0, i if (spans[4] and grid_along_k) else 0)

    return pl.BlockSpec((None, None, None, rows, cols), index)


def _whole(x):
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pad_to(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_inputs(layout, q, k, v, biases):
    d = layout.padded_d
    q = _pad_to(_pad_to(q, 4, d), 2, layout.padded_q)
    k = _pad_to(_pad_to(k, 4, d), 2, layout.padded_k)
    v = _pad_to(_pad_to(v, 4, d), 2, layout.padded_k)
    biases = tuple(_pad_to(_pad_to(b, 3, layout.padded_q if b.shape[3] != 1 else 1), 4,
                           layout.padded_k if b.shape[4] != 1 else 1) for b in biases)
    return q, k, v, biases


def _forward(q, k, v, biases, scale, layout, interpret, params):
    """Padded inputs -> padded output [B, N, Lqp, H, Dp] and lse [B, N, H, Lqp]."""
    grid = (layout.batch, layout.rows, layout.heads, layout.q_blocks)
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, layout=layout),
        grid=grid,
        in_specs=[_qkv_spec(layout, layout.block_q, False), _qkv_spec(layout, None, True),
                  _qkv_spec(layout, None, True)] + [_bias_spec(layout, sp, False) for sp in layout.spans],
        out_specs=[_qkv_spec(layout, layout.block_q, False), _row_spec(layout, False)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((layout.batch, layout.rows, layout.heads, layout.padded_q), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="evoformer_attention_forward",
    )(q, k, v, *biases)


def _backward(q, k, v, biases, out, lse, do, scale, layout, interpret, params):
    """Padded inputs -> padded gradients of q, k, v and each bias."""
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 1, 3, 2)
    operands = (q, k, v, do, lse, delta)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, layout=layout),
        grid=(layout.batch, layout.rows, layout.heads, layout.q_blocks),
        in_specs=[_qkv_spec(layout, layout.block_q, False), _qkv_spec(layout, None, True),
                  _qkv_spec(layout, None, True), _qkv_spec(layout, layout.block_q, False),
                  _row_spec(layout, False), _row_spec(layout, False)]
        + [_bias_spec(layout, sp, False) for sp in layout.spans],
        out_specs=_qkv_spec(layout, layout.block_q, False),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="evoformer_attention_dq",
    )(*operands, *biases)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, layout=layout),
        grid=(layout.batch, layout.rows, layout.heads, layout.k_blocks),
        in_specs=[_qkv_spec(layout, None, False), _qkv_spec(layout, layout.block_k, True),
                  _qkv_spec(layout, layout.block_k, True), _qkv_spec(layout, None, False),
                  _row_spec(layout, True), _row_spec(layout, True)]
        + [_bias_spec(layout, sp, True) for sp in layout.spans],
        out_specs=[_qkv_spec(layout, layout.block_k, True)] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="evoformer_attention_dkv",
    )(*operands, *biases)
    dbiases = []
    for which, (bias, spans) in enumerate(zip(biases, layout.spans, strict=True)):
        extents = (layout.batch, layout.rows, layout.heads, layout.q_blocks, layout.k_blocks)
        grid = tuple(e if s else 1 for e, s in zip(extents, spans, strict=True))
        block = (None, None, None, layout.block_q if spans[3] else 1, layout.block_k if spans[4] else 1)
        dbiases.append(pl.pallas_call(
            functools.partial(_dbias_kernel, scale=scale, layout=layout, which=which),
            grid=grid,
            in_specs=[_whole(x) for x in (*operands, *biases)],
            out_specs=pl.BlockSpec(block, lambda b, n, h, i, j: (b, n, h, i, j)),
            out_shape=jax.ShapeDtypeStruct(bias.shape, bias.dtype),
            compiler_params=params,
            interpret=interpret,
            name=f"evoformer_attention_dbias{which}",
        )(*operands, *biases))
    return dq, dk, dv, tuple(dbiases)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _attention(q, k, v, biases, scale, block_q, block_k, interpret, num_warps, num_stages):
    return _attention_fwd(q, k, v, biases, scale, block_q, block_k, interpret, num_warps, num_stages)[0]


def _attention_fwd(q, k, v, biases, scale, block_q, block_k, interpret, num_warps, num_stages):
    layout = _Layout(q, k, biases, block_q, block_k)
    out, lse = _forward(*_pad_inputs(layout, q, k, v, biases), scale, layout, interpret,
                        _params(num_warps, num_stages))
    # The unpadded inputs are residuals (they are alive anyway); padding is redone in the backward.
    return out[:, :, : layout.length_q, :, : layout.dim], (q, k, v, biases, out, lse)


def _attention_bwd(scale, block_q, block_k, interpret, num_warps, num_stages, residuals, do):
    q, k, v, biases, out, lse = residuals
    layout = _Layout(q, k, biases, block_q, block_k)
    do = _pad_to(_pad_to(do, 4, layout.padded_d), 2, layout.padded_q)
    dq, dk, dv, dbiases = _backward(*_pad_inputs(layout, q, k, v, biases), out, lse, do, scale, layout, interpret,
                                    _params(num_warps, num_stages))
    lq, lk, d = layout.length_q, layout.length_k, layout.dim
    return (dq[:, :, :lq, :, :d], dk[:, :, :lk, :, :d], dv[:, :, :lk, :, :d],
            tuple(g[..., : b.shape[3], : b.shape[4]] for b, g in zip(biases, dbiases, strict=True)))


_attention.defvjp(_attention_fwd, _attention_bwd)


def evoformer_attention(q, k, v, biases=(), *, scale=None, block_q=None, block_k=None, interpret=False,
                        num_warps=4, num_stages=2):
    """Pallas Evoformer attention; same contract as `jaxllm.ops.evoformer_attention`.

    Args:
      q, k, v: `[B, N, L, H, D]` (k, v may have their own length), one floating dtype.
      biases: rank-5 arrays broadcastable to `[B, N, H, Lq, Lk]`, q's dtype; `None` entries ignored.
      scale: default `1 / sqrt(D)`.
      block_q, block_k: tile sizes, powers of two >= 16 (default 64, or less for short inputs).
      interpret: run the kernels with the Pallas interpreter (any backend, slow).
      num_warps, num_stages: Triton launch parameters.
    """
    biases = check_inputs(q, k, v, biases)
    lq, lk = q.shape[2], k.shape[2]
    block_q = block_q or min(64, _pow2_at_least_16(lq))
    block_k = block_k or min(64, _pow2_at_least_16(lk))
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value < 16 or value & (value - 1):
            raise UserError(f"evoformer_attention (pallas): {name} must be a power of two >= 16, got {value}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attention(q, k, v, biases, scale, int(block_q), int(block_k), bool(interpret), int(num_warps),
                      int(num_stages))
