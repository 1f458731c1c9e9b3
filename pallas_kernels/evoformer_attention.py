"""Evoformer attention as Pallas kernels for TPU (Mosaic) and GPU (Triton), forward and backward.

Computes the same function as `jaxllm.ops.evoformer_attention_reference`:

    O = softmax(Q K^T * scale + sum_t bias_t) V,   Q, K, V: [B, N, L, H, D],  bias_t -> [B, N, H, Lq, Lk]

Kernels, each one program per tile, with an online softmax in f32 (FlashAttention-2, Dao 2023):

* forward, grid (B, N, H, query blocks): streams key blocks, writes O and the log-sum-exp
  `lse = m + log l` (+inf for a row whose scores are all -inf; such a row outputs 0);
* dQ, grid (B, N, H, query blocks), and dK/dV, grid (B, N, H, key blocks): recompute
  `P = exp(S - lse)`, `dS = P * (dO V^T - rowsum(dO * O))`;
* one bias-gradient kernel per bias that sums `dS` in f32 over the axes the bias is broadcast along,
  so a pair bias `[B, 1, H, L, L]` gets its sum over N without any `[B, N, H, L, L]` array existing.
  On GPU one program per tile of the bias loops over those axes (Triton programs run in parallel, so
  no two may write one tile); on TPU the broadcast axes are trailing "arbitrary" grid axes whose
  programs run in order and accumulate into the output tile they share, which stays in VMEM.

Inside, arrays are heads-major, `[B, N, H, L, D]`: Mosaic TPU needs a block's last two dimensions to
be (8, 128)-aligned or whole, which a tile that squeezes H out of `[.., L, H, D]` cannot be. Row
statistics (lse, delta) are `[B, N, H, Lq, 1]` columns for the same reason. Lengths are padded to a
multiple of the blocks and D to a power of two >= 16 (Triton's `tl.dot` needs power-of-two tiles of
at least 16); padded keys are masked with -inf, padded queries carry zero `dO` and so contribute
nothing to any gradient. A bias axis of size 1 always maps to block 0, so no bias is ever expanded.

The backend (Mosaic TPU, Triton, or the interpreter on CPU) follows the platform compiled for
(`pallas_kernels.platforms`). Importing this module needs neither a TPU nor a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.errors import UserError
from pallas_kernels.evoformer_inputs import check_inputs
from pallas_kernels.platforms import by_platform, compiler_params
from pallas_kernels.tiles import dot_nn, dot_nt, dot_tn

NEG_INF = -jnp.inf
TPU_LANES = 128  # a TPU bias tile's key axis is its lane (last) dimension


def _pow2_at_least_16(n: int) -> int:
    return max(16, pl.next_power_of_2(n))


def _block_for(backend: str, block: int | None, length: int) -> int:
    """Tile size along a length: default 64 (Triton, interpreter) or 128 (TPU), at most the padded
    length. On TPU a block below 128 that does not cover the length grows to 128, since bias tiles
    take the key block as their lane dimension."""
    whole = _pow2_at_least_16(length)
    if backend == "mosaic_tpu":
        return min(max(block or TPU_LANES, TPU_LANES), whole)
    return min(block or 64, whole)


class _Layout:
    """Static sizes shared by the kernels of one call (q, k and biases in the caller's layout)."""

    def __init__(self, q, k, biases, block_q, block_k, backend, num_warps, num_stages):
        self.num_warps, self.num_stages = num_warps, num_stages  # Triton launch parameters
        self.batch, self.rows, self.length_q, self.heads, self.dim = q.shape
        self.length_k = k.shape[2]
        self.backend = backend
        self.block_q = _block_for(backend, block_q, self.length_q)
        self.block_k = _block_for(backend, block_k, self.length_k)
        self.padded_q = -(-self.length_q // self.block_q) * self.block_q
        self.padded_k = -(-self.length_k // self.block_k) * self.block_k
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
    def extents(self):
        """Grid extents of the five score axes (B, N, H, query blocks, key blocks)."""
        return (self.batch, self.rows, self.heads, self.q_blocks, self.k_blocks)

    @property
    def key_padding(self):
        return self.padded_k != self.length_k

    def params(self, parallel_axes, reduction_axes=0):
        return compiler_params(self.backend, parallel_axes=parallel_axes, reduction_axes=reduction_axes,
                               num_warps=self.num_warps, num_stages=self.num_stages)


def _ds(index, size):
    """`pl.ds` over block `index`; the hint lets Mosaic prove the start is tile-aligned."""
    return pl.ds(pl.multiple_of(index * size, size), size)


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


def _probabilities_and_ds(q, k, v, do, lse, delta, tiles, scale, key_start, layout):
    """Recomputed `P = exp(S - lse)` and `dS = P * (dO V^T - delta)` of one tile ([bq, 1] lse, delta)."""
    p = jnp.exp(_scores(q, k, tiles, scale, key_start, layout) - lse)
    return p, p * (dot_nt(do, v) - delta)


# ----------------------------------------------------------------------------------------------------
# Forward.


def _forward_kernel(q_ref, k_ref, v_ref, *refs, scale, layout):
    *bias_refs, o_ref, lse_ref = refs
    bq, bk = layout.block_q, layout.block_k
    q = q_ref[...]

    def body(j, carry):
        m_prev, l_prev, acc = carry
        cols = _ds(j, bk)
        tiles = [_bias_tile(r, sp, None, cols) for r, sp in zip(bias_refs, layout.spans, strict=True)]
        s = _scores(q, k_ref[cols, :], tiles, scale, j * bk, layout)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        correction = jnp.exp(m_prev - m_safe)
        v = v_ref[cols, :]
        acc = acc * correction + dot_nn(p.astype(v.dtype), v)
        return m_new, l_prev * correction + jnp.sum(p, axis=1, keepdims=True), acc

    init = (jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, layout.padded_d), jnp.float32))
    m, denom, acc = lax.fori_loop(0, layout.k_blocks, body, init)
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(safe))


# ----------------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, layout):
    *bias_refs, dq_ref = refs
    bk = layout.block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        cols = _ds(j, bk)
        tiles = [_bias_tile(r, sp, None, cols) for r, sp in zip(bias_refs, layout.spans, strict=True)]
        k = k_ref[cols, :]
        _, ds = _probabilities_and_ds(q, k, v_ref[cols, :], do, lse, delta, tiles, scale, j * bk, layout)
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
        rows = _ds(i, bq)
        tiles = [_bias_tile(r, sp, rows, None) for r, sp in zip(bias_refs, layout.spans, strict=True)]
        q, do = q_ref[rows, :], do_ref[rows, :]
        p, ds = _probabilities_and_ds(q, k, v, do, lse_ref[rows, :], delta_ref[rows, :], tiles, scale, key_start,
                                      layout)
        return dk + dot_tn(ds.astype(q.dtype), q), dv + dot_tn(p.astype(do.dtype), do)

    zeros = jnp.zeros((layout.block_k, layout.padded_d), jnp.float32)
    dk, dv = lax.fori_loop(0, layout.q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _reduce_broadcast(ds, spans):
    """Sums a [bq, bk] dS tile over the query / key axis when the bias is broadcast along it."""
    if not spans[3]:
        ds = jnp.sum(ds, axis=0, keepdims=True)
    if not spans[4]:
        ds = jnp.sum(ds, axis=1, keepdims=True)
    return ds


def _dbias_loop_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, layout, which):
    """GPU: the gradient tile of bias `which`, looping over every index it is broadcast along."""
    *bias_refs, db_ref = refs
    bq, bk = layout.block_q, layout.block_k
    spans = layout.spans[which]
    extents = layout.extents
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
        _, ds = _probabilities_and_ds(q_ref[b, n, h, rows, :], k_ref[b, n, h, cols, :], v_ref[b, n, h, cols, :],
                                      do_ref[b, n, h, rows, :], lse_ref[b, n, h, rows, :],
                                      delta_ref[b, n, h, rows, :], tiles, scale, j * bk, layout)
        return acc + _reduce_broadcast(ds, spans)

    shape = (bq if spans[3] else 1, bk if spans[4] else 1)
    db_ref[...] = lax.fori_loop(0, count, body, jnp.zeros(shape, jnp.float32)).astype(db_ref.dtype)


def _dbias_grid_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, layout, which, order):
    """TPU: one tile of dS, added to the f32 gradient tile of bias `which`. The grid visits the axes in
    `order` (spanned first, broadcast last), so the programs summing into one tile run back to back and
    the first of them zeroes it."""
    *bias_refs, db_ref = refs
    spans = layout.spans[which]
    grid_ids = [pl.program_id(g) for g in range(5)]
    index = [grid_ids[order.index(a)] for a in range(5)]
    reduced = [grid_ids[g] for g, a in enumerate(order) if not spans[a]]
    tiles = [_bias_tile(r, sp, None, None) for r, sp in zip(bias_refs, layout.spans, strict=True)]
    _, ds = _probabilities_and_ds(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                                  tiles, scale, index[4] * layout.block_k, layout)
    ds = _reduce_broadcast(ds, spans)
    if not reduced:  # the bias spans every axis: each program owns its tile
        db_ref[...] = ds
        return
    first = functools.reduce(jnp.logical_and, [r == 0 for r in reduced])

    @pl.when(first)
    def _():
        db_ref[...] = jnp.zeros(db_ref.shape, db_ref.dtype)

    db_ref[...] += ds


# ----------------------------------------------------------------------------------------------------
# pallas_call wrappers on the heads-major layout [B, N, H, Lp, Dp].


def _qkv_spec(layout, block, along_k):
    """Block of a [B, N, H, Lp, Dp] array: one (b, n, h) and either one block or the whole length."""
    if block is None:
        return pl.BlockSpec((None, None, None, layout.padded_k if along_k else layout.padded_q, layout.padded_d),
                            lambda b, n, h, i: (b, n, h, 0, 0))
    return pl.BlockSpec((None, None, None, block, layout.padded_d), lambda b, n, h, i: (b, n, h, i, 0))


def _row_spec(layout, whole):
    """Block of a [B, N, H, Lqp, 1] f32 column (lse, delta)."""
    if whole:
        return pl.BlockSpec((None, None, None, layout.padded_q, 1), lambda b, n, h, i: (b, n, h, 0, 0))
    return pl.BlockSpec((None, None, None, layout.block_q, 1), lambda b, n, h, i: (b, n, h, i, 0))


def _bias_spec(layout, spans, grid_along_k):
    """Block of a padded bias for a (b, n, h, block) grid: broadcast axes always read block 0."""
    rows = (layout.block_q if not grid_along_k else layout.padded_q) if spans[3] else 1
    cols = (layout.block_k if grid_along_k else layout.padded_k) if spans[4] else 1

    def index(b, n, h, i):
        return (b if spans[0] else 0, n if spans[1] else 0, h if spans[2] else 0,
                i if (spans[3] and not grid_along_k) else 0, i if (spans[4] and grid_along_k) else 0)

    return pl.BlockSpec((None, None, None, rows, cols), index)


def _pad_to(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _heads_major(x, length):
    """[B, N, L, H, D] -> padded [B, N, H, length, Dp]."""
    x = jnp.swapaxes(x, 2, 3)
    return _pad_to(_pad_to(x, 4, _pow2_at_least_16(x.shape[4])), 3, length)


def _caller_layout(x, length, dim):
    """Padded [B, N, H, Lp, Dp] -> [B, N, length, H, dim]."""
    return jnp.swapaxes(x[:, :, :, :length, :dim], 2, 3)


def _pad_inputs(layout, q, k, v, biases):
    q = _heads_major(q, layout.padded_q)
    k, v = _heads_major(k, layout.padded_k), _heads_major(v, layout.padded_k)
    biases = tuple(_pad_to(_pad_to(b, 3, layout.padded_q if b.shape[3] != 1 else 1), 4,
                           layout.padded_k if b.shape[4] != 1 else 1) for b in biases)
    return q, k, v, biases


def _call(layout, kernel, grid, in_specs, out_specs, out_shape, name, reduction_axes=0):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=layout.params(len(grid) - reduction_axes, reduction_axes),
                          interpret=layout.backend == "interpret", name=name)


def _forward(q, k, v, biases, scale, layout):
    """Padded inputs -> padded output [B, N, H, Lqp, Dp] and lse [B, N, H, Lqp, 1]."""
    b, n, h = layout.batch, layout.rows, layout.heads
    return _call(
        layout, functools.partial(_forward_kernel, scale=scale, layout=layout), (b, n, h, layout.q_blocks),
        [_qkv_spec(layout, layout.block_q, False), _qkv_spec(layout, None, True), _qkv_spec(layout, None, True)]
        + [_bias_spec(layout, sp, False) for sp in layout.spans],
        [_qkv_spec(layout, layout.block_q, False), _row_spec(layout, False)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, h, layout.padded_q, 1), jnp.float32)],
        "evoformer_attention_forward",
    )(q, k, v, *biases)


def _dbias(operands, biases, which, scale, layout):
    """Gradient of bias `which` (its own padded shape, its dtype)."""
    spans = layout.spans[which]
    bias = biases[which]
    block = (None, None, None, layout.block_q if spans[3] else 1, layout.block_k if spans[4] else 1)
    if layout.backend != "mosaic_tpu":
        grid = tuple(e if s else 1 for e, s in zip(layout.extents, spans, strict=True))
        return _call(
            layout, functools.partial(_dbias_loop_kernel, scale=scale, layout=layout, which=which), grid,
            [pl.BlockSpec(x.shape, lambda *_, r=x.ndim: (0,) * r) for x in (*operands, *biases)],
            pl.BlockSpec(block, lambda b, n, h, i, j: (b, n, h, i, j)),
            jax.ShapeDtypeStruct(bias.shape, bias.dtype), f"evoformer_attention_dbias{which}",
        )(*operands, *biases)
    order = tuple(a for a in range(5) if spans[a]) + tuple(a for a in range(5) if not spans[a])

    def spec(block_shape, index):
        """A BlockSpec whose index map reads the score axes (b, n, h, i, j) back out of the grid order."""
        return pl.BlockSpec(block_shape, lambda *g: index(*(g[order.index(a)] for a in range(5))))

    def bias_spec(sp):
        return spec((None, None, None, layout.block_q if sp[3] else 1, layout.block_k if sp[4] else 1),
                    lambda b, n, h, i, j: (b if sp[0] else 0, n if sp[1] else 0, h if sp[2] else 0,
                                           i if sp[3] else 0, j if sp[4] else 0))

    rows = spec((None, None, None, layout.block_q, layout.padded_d), lambda b, n, h, i, j: (b, n, h, i, 0))
    cols = spec((None, None, None, layout.block_k, layout.padded_d), lambda b, n, h, i, j: (b, n, h, j, 0))
    stat = spec((None, None, None, layout.block_q, 1), lambda b, n, h, i, j: (b, n, h, i, 0))
    grad = _call(
        layout, functools.partial(_dbias_grid_kernel, scale=scale, layout=layout, which=which, order=order),
        tuple(layout.extents[a] for a in order),
        [rows, cols, cols, rows, stat, stat] + [bias_spec(sp) for sp in layout.spans], bias_spec(spans),
        jax.ShapeDtypeStruct(bias.shape, jnp.float32), f"evoformer_attention_dbias{which}",
        reduction_axes=5 - sum(spans),
    )(*operands, *biases)
    return grad.astype(bias.dtype)


def _backward(q, k, v, biases, out, lse, do, scale, layout):
    """Padded inputs -> padded gradients of q, k, v and each bias."""
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    operands = (q, k, v, do, lse, delta)
    grid = (layout.batch, layout.rows, layout.heads)
    dq = _call(
        layout, functools.partial(_dq_kernel, scale=scale, layout=layout), (*grid, layout.q_blocks),
        [_qkv_spec(layout, layout.block_q, False), _qkv_spec(layout, None, True), _qkv_spec(layout, None, True),
         _qkv_spec(layout, layout.block_q, False), _row_spec(layout, False), _row_spec(layout, False)]
        + [_bias_spec(layout, sp, False) for sp in layout.spans],
        _qkv_spec(layout, layout.block_q, False), jax.ShapeDtypeStruct(q.shape, q.dtype), "evoformer_attention_dq",
    )(*operands, *biases)
    dk, dv = _call(
        layout, functools.partial(_dkv_kernel, scale=scale, layout=layout), (*grid, layout.k_blocks),
        [_qkv_spec(layout, None, False), _qkv_spec(layout, layout.block_k, True),
         _qkv_spec(layout, layout.block_k, True), _qkv_spec(layout, None, False), _row_spec(layout, True),
         _row_spec(layout, True)] + [_bias_spec(layout, sp, True) for sp in layout.spans],
        [_qkv_spec(layout, layout.block_k, True)] * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], "evoformer_attention_dkv",
    )(*operands, *biases)
    return dq, dk, dv, tuple(_dbias(operands, biases, i, scale, layout) for i in range(len(biases)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, biases, scale, layout):
    return _attention_fwd(q, k, v, biases, scale, layout)[0]


def _attention_fwd(q, k, v, biases, scale, layout):
    out, lse = _forward(*_pad_inputs(layout, q, k, v, biases), scale, layout)
    # The unpadded inputs are residuals (they are alive anyway); padding is redone in the backward.
    return _caller_layout(out, layout.length_q, layout.dim), (q, k, v, biases, out, lse)


def _attention_bwd(scale, layout, residuals, do):
    q, k, v, biases, out, lse = residuals
    do = _heads_major(do, layout.padded_q)
    dq, dk, dv, dbiases = _backward(*_pad_inputs(layout, q, k, v, biases), out, lse, do, scale, layout)
    lq, lk, d = layout.length_q, layout.length_k, layout.dim
    return (_caller_layout(dq, lq, d), _caller_layout(dk, lk, d), _caller_layout(dv, lk, d),
            tuple(g[..., : b.shape[3], : b.shape[4]] for b, g in zip(biases, dbiases, strict=True)))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_for(q, k, v, biases, *, backend, scale, block_q, block_k, num_warps, num_stages):
    layout = _Layout(q, k, biases, block_q, block_k, backend, num_warps, num_stages)
    return _attention(q, k, v, biases, scale, layout)


def evoformer_attention(q, k, v, biases=(), *, scale=None, block_q=None, block_k=None, interpret=False,
                        backend=None, num_warps=4, num_stages=2):
    """Pallas Evoformer attention; same contract as `jaxllm.ops.evoformer_attention`.

    Args:
      q, k, v: `[B, N, L, H, D]` (k, v may have their own length), one floating dtype.
      biases: rank-5 arrays broadcastable to `[B, N, H, Lq, Lk]`, q's dtype; `None` entries ignored.
      scale: default `1 / sqrt(D)`.
      block_q, block_k: tile sizes, powers of two >= 16 (default 64 on GPU and in the interpreter,
        128 on TPU, where smaller blocks grow to 128; less for short inputs).
      interpret: run the kernels with the Pallas interpreter on every platform (slow); otherwise the
        backend follows the platform compiled for.
      backend: force one variant on every platform ("mosaic_tpu", "triton" or "interpret"; see
        `pallas_kernels.platforms.by_platform`).
      num_warps, num_stages: Triton launch parameters.
    """
    biases = check_inputs(q, k, v, biases)
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise UserError(f"evoformer_attention (pallas): {name} must be a power of two >= 16, got {value}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return by_platform(_attention_for, q, k, v, biases, interpret=interpret, backend=backend, scale=scale,
                       block_q=block_q, block_k=block_k, num_warps=int(num_warps), num_stages=int(num_stages))
