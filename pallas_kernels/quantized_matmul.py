"""Quantized matmuls as Pallas kernels: integer weight codes with per-group scales, forward and backward.

Computes `x @ W` with `W = codes * scale (+ zero)` dequantized tile by tile inside the kernel, so the
weight stays in integer form in memory (the reference is `jaxllm.compression.qtensor.QuantizedWeight
.dequantize` followed by a plain matmul):

- `quantized_matmul(x, codes, scale, zero, bits=, signed=, k=)`: f32/bf16 activations `[M, K]` times
  int8 codes (`bits` 5-8), 4-bit codes packed two per byte (3-4) or 2-bit codes packed four per byte
  (1-2, ternary/binary), packed along K as `jaxllm.compression.packing` stores them. `scale` / `zero`
  are `[Kg, N]`: K is cut into Kg equal row groups, each with its own scale per output column
  (`column_scales` turns a weight's block grid into this form).
- `int8_matmul(x, codes, scale)`: W8A8. Each row (token) of `x` is quantized to int8 with its own
  scale `2 max|x_i| / 256` (DeepSpeed's dynamic symmetric activation quantizer); the kernel
  accumulates int8 x int8 products in int32 and applies both scales to the sum.

Both are `custom_vjp`s differentiable in `x` (the activation quantization is straight-through):
`dx = g @ W^T` by a second kernel that dequantizes the same tiles. Codes and scales get no gradient.

Packed codes are handled without interleaving inside the kernel: a byte row holds the codes of P =
8 / width consecutive K rows; plane p of the packed tile multiplies the activation columns `i P + p`,
which are split out of `x` (and merged back into `dx`) outside the kernel. One program per
(M block, N block) loops over K tiles (forward); the backward kernel's programs are (M block, K block)
and loop over N. Every dimension is padded to its block (zero activations and zero codes add
nothing; padded rows fall in no group). The backend (Mosaic TPU, Triton, or the interpreter on CPU)
follows the platform compiled for (`pallas_kernels.platforms`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.packing import field_width, packed_rows
from pallas_kernels.platforms import by_platform, compiler_params
from pallas_kernels.tiles import dot


def column_scales(grid: jax.Array, n: int) -> jax.Array:
    """A `[Rs, Cs]` scale block grid as `[Rs, n]` (each output column its own copy)."""
    return jnp.repeat(grid, n // grid.shape[1], axis=1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _block_m(m: int, block_m: int | None) -> int:
    if block_m is not None:
        return block_m
    return min(128, max(16, 1 << (max(m, 1) - 1).bit_length()))


def _planes(stored, width: int, signed: bool):
    """The `8 / width` code planes (int32) of a tile of stored bytes."""
    s = stored.astype(jnp.int32)
    if width == 8:
        return [s]
    mask, half = (1 << width) - 1, 1 << (width - 1)
    planes = []
    for p in range(8 // width):
        field = (s >> (8 - width * (p + 1))) & mask
        planes.append(jnp.where(field >= half, field - (1 << width), field) if signed else field)
    return planes


def _row_values(ref, first_row, rows: int, planes: int, p: int, group_rows: int, groups: int, cols):
    """Per-(row, column) values of a `[groups, N]` scale grid for K rows `(first_row + i) * planes + p`."""
    if groups == 1:
        return ref[0:1, cols]
    k_rows = (first_row + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)) * planes + p
    onehot = (k_rows // group_rows == lax.broadcasted_iota(jnp.int32, (1, ref.shape[0]), 1)).astype(jnp.float32)
    return dot(onehot, ref[:, cols], ((1,), (0,)))


def _dequant(stored, s_ref, z_ref, first_row, cols, *, width, signed, group_rows, groups):
    rows = stored.shape[0]
    planes = _planes(stored, width, signed)
    out = []
    for p, codes in enumerate(planes):
        w = codes.astype(jnp.float32) * _row_values(s_ref, first_row, rows, len(planes), p, group_rows, groups, cols)
        if z_ref is not None:
            w = w + _row_values(z_ref, first_row, rows, len(planes), p, group_rows, groups, cols)
        out.append(w)
    return out


def _fwd_kernel(x_ref, c_ref, s_ref, *rest, width, signed, group_rows, groups, block_k, asym):
    z_ref, o_ref = (rest[0], rest[1]) if asym else (None, rest[0])
    planes = 8 // width
    cols = slice(None)

    def body(t, acc):
        rows = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        ws = _dequant(c_ref[rows, :], s_ref, z_ref, t * block_k, cols, width=width, signed=signed,
                      group_rows=group_rows, groups=groups)
        for p in range(planes):
            x = x_ref[p, :, rows]
            acc = acc + dot(x, ws[p].astype(x.dtype), ((1,), (0,)))
        return acc

    steps = c_ref.shape[0] // block_k
    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def _bwd_kernel(g_ref, c_ref, s_ref, *rest, width, signed, group_rows, groups, block_n, asym):
    z_ref, o_ref = (rest[0], rest[1]) if asym else (None, rest[0])
    planes = 8 // width
    first_row = pl.program_id(1) * c_ref.shape[0]

    def body(j, acc):
        cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        ws = _dequant(c_ref[:, cols], s_ref, z_ref, first_row, cols, width=width, signed=signed,
                      group_rows=group_rows, groups=groups)
        g = g_ref[:, cols]
        return tuple(acc[p] + dot(g, ws[p].astype(g.dtype), ((1,), (1,))) for p in range(planes))

    steps = g_ref.shape[1] // block_n
    init = tuple(jnp.zeros(o_ref.shape[1:], jnp.float32) for _ in range(planes))
    out = lax.fori_loop(0, steps, body, init)
    for p in range(planes):
        o_ref[p] = out[p]


def _i8_kernel(x_ref, c_ref, xs_ref, s_ref, o_ref, *, block_k):
    def body(t, acc):
        rows = pl.ds(pl.multiple_of(t * block_k, block_k), block_k)
        return acc + dot(x_ref[:, rows], c_ref[rows, :], ((1,), (0,)), out=jnp.int32)

    acc = lax.fori_loop(0, c_ref.shape[0] // block_k, body, jnp.zeros(o_ref.shape, jnp.int32))
    o_ref[...] = acc.astype(jnp.float32) * xs_ref[...] * s_ref[...]


class _Layout:
    """Padded sizes of one call: M, N, packed K rows and the blocks over them."""

    def __init__(self, m, n, k, bits, block_m, block_n, block_k):
        self.width = field_width(bits)
        self.planes = 8 // self.width
        self.m, self.n, self.k = m, n, k
        self.bm = _block_m(m, block_m)
        self.bn = block_n
        self.bk = block_k  # in packed (byte) rows
        self.mp = _round_up(m, self.bm)
        self.np_ = _round_up(n, self.bn)
        self.kb = _round_up(packed_rows(k, bits), self.bk)

    def x_planes(self, x):
        """`[M, K]` -> `[planes, Mp, Kb]`: plane p holds columns `i * planes + p`."""
        xp = jnp.pad(x, ((0, self.mp - self.m), (0, self.kb * self.planes - self.k)))
        return xp.reshape(self.mp, self.kb, self.planes).transpose(2, 0, 1)

    def codes(self, codes):
        return jnp.pad(codes, ((0, self.kb - codes.shape[0]), (0, self.np_ - self.n)))

    def columns(self, grid):
        groups = grid.shape[0]
        return jnp.pad(grid.astype(jnp.float32), ((0, _round_up(groups, 8) - groups), (0, self.np_ - self.n)))


def _forward(x, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend):
    m, n = x.shape[0], codes.shape[1]
    lay = _Layout(m, n, k, bits, block_m, block_n, block_k)
    groups = scale.shape[0]
    asym = zero is not None
    side = [lay.columns(scale)] + ([lay.columns(zero)] if asym else [])
    grid_spec = pl.BlockSpec((side[0].shape[0], lay.bn), lambda i, j: (0, j))
    kernel = functools.partial(_fwd_kernel, width=lay.width, signed=signed, group_rows=k // groups, groups=groups,
                               block_k=lay.bk, asym=asym)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lay.mp, lay.np_), jnp.float32),
        grid=(lay.mp // lay.bm, lay.np_ // lay.bn),
        in_specs=[pl.BlockSpec((lay.planes, lay.bm, lay.kb), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((lay.kb, lay.bn), lambda i, j: (0, j))] + [grid_spec] * len(side),
        out_specs=pl.BlockSpec((lay.bm, lay.bn), lambda i, j: (i, j)),
        compiler_params=compiler_params(backend, parallel_axes=2),
        interpret=backend == "interpret",
    )(lay.x_planes(x), lay.codes(codes), *side)
    return out[:m, :n]


def _backward_dx(g, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend, dtype):
    m, n = g.shape
    lay = _Layout(m, n, k, bits, block_m, block_n, block_k)
    groups = scale.shape[0]
    asym = zero is not None
    side = [lay.columns(scale)] + ([lay.columns(zero)] if asym else [])
    gp = jnp.pad(g.astype(dtype), ((0, lay.mp - m), (0, lay.np_ - n)))
    kernel = functools.partial(_bwd_kernel, width=lay.width, signed=signed, group_rows=k // groups, groups=groups,
                               block_n=lay.bn, asym=asym)
    planes = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lay.planes, lay.mp, lay.kb), jnp.float32),
        grid=(lay.mp // lay.bm, lay.kb // lay.bk),
        in_specs=[pl.BlockSpec((lay.bm, lay.np_), lambda i, t: (i, 0)),
                  pl.BlockSpec((lay.bk, lay.np_), lambda i, t: (t, 0))]
                 + [pl.BlockSpec((side[0].shape[0], lay.np_), lambda i, t: (0, 0))] * len(side),
        out_specs=pl.BlockSpec((lay.planes, lay.bm, lay.bk), lambda i, t: (0, i, t)),
        compiler_params=compiler_params(backend, parallel_axes=2),
        interpret=backend == "interpret",
    )(gp, lay.codes(codes), *side)
    dx = planes.transpose(1, 2, 0).reshape(lay.mp, lay.kb * lay.planes)
    return dx[:m, :k]


def _no_grad(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _qmm(x, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend):
    return _forward(x, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend)


def _qmm_fwd(x, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend):
    out = _forward(x, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend)
    return out, (codes, scale, zero, jnp.zeros((0,), x.dtype))


def _qmm_bwd(bits, signed, k, block_m, block_n, block_k, backend, res, g):
    codes, scale, zero, x_like = res
    dx = _backward_dx(g, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend, x_like.dtype)
    return dx.astype(x_like.dtype), _no_grad(codes), _no_grad(scale), None if zero is None else _no_grad(zero)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(x, codes, scale, zero=None, *, bits: int, signed: bool, k: int, block_m: int | None = None,
                     block_n: int = 128, block_k: int = 128, interpret: bool = False):
    """`x [M, K] @ dequant(codes) [K, N]` in f32 (see the module doc for the layouts).

    Args:
      x: `[M, K]` f32 or bf16 activations (the dot runs in their dtype with f32 accumulation).
      codes: `[packed_rows(K, bits), N]` stored codes (int8 / uint8).
      scale, zero: `[Kg, N]` f32 per (K row group, column); `zero` only for asymmetric codes.
      bits: the codes' bits (1..8); signed: two's complement codes (all but asymmetric).
      k: the true K (the codes may hold padding rows).
      block_m, block_n: output tile; block_k: packed K rows per step. interpret: Pallas interpreter.
    """
    if scale.shape[0] < 1 or k % scale.shape[0]:
        raise ValueError(f"quantized_matmul: {scale.shape[0]} row groups do not divide K={k}")
    return by_platform(_qmm_for, x, codes, scale, zero, interpret=interpret, bits=bits, signed=bool(signed), k=k,
                       block_m=block_m, block_n=block_n, block_k=block_k)


def _qmm_for(x, codes, scale, zero, *, backend, bits, signed, k, block_m, block_n, block_k):
    return _qmm(x, codes, scale, zero, bits, signed, k, block_m, block_n, block_k, backend)


def quantize_rows_int8(x):
    """Per-row symmetric int8 codes and scales `2 max|x_i| / 256` (DeepSpeed's token-wise A8)."""
    xf = x.astype(jnp.float32)
    scale = 2.0 * jnp.max(jnp.abs(xf), axis=1, keepdims=True) / 256.0
    codes = jnp.clip(jnp.round(xf / jnp.where(scale > 0, scale, 1.0)), -128, 127).astype(jnp.int8)
    return codes, scale


def _i8_forward(x, codes, scale, block_m, block_n, block_k, backend):
    m, k = x.shape
    n = codes.shape[1]
    lay = _Layout(m, n, k, 8, block_m, block_n, block_k)
    xq, xs = quantize_rows_int8(x)
    xq = jnp.pad(xq, ((0, lay.mp - m), (0, lay.kb - k)))
    xs = jnp.pad(xs, ((0, lay.mp - m), (0, 0)))
    sp = jnp.pad(scale.astype(jnp.float32), ((0, 0), (0, lay.np_ - n)))
    out = pl.pallas_call(
        functools.partial(_i8_kernel, block_k=lay.bk),
        out_shape=jax.ShapeDtypeStruct((lay.mp, lay.np_), jnp.float32),
        grid=(lay.mp // lay.bm, lay.np_ // lay.bn),
        in_specs=[pl.BlockSpec((lay.bm, lay.kb), lambda i, j: (i, 0)),
                  pl.BlockSpec((lay.kb, lay.bn), lambda i, j: (0, j)),
                  pl.BlockSpec((lay.bm, 1), lambda i, j: (i, 0)),
                  pl.BlockSpec((1, lay.bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((lay.bm, lay.bn), lambda i, j: (i, j)),
        compiler_params=compiler_params(backend, parallel_axes=2),
        interpret=backend == "interpret",
    )(xq, lay.codes(codes.astype(jnp.int8)), xs, sp)
    return out[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _i8mm(x, codes, scale, block_m, block_n, block_k, backend):
    return _i8_forward(x, codes, scale, block_m, block_n, block_k, backend)


def _i8mm_fwd(x, codes, scale, block_m, block_n, block_k, backend):
    return _i8_forward(x, codes, scale, block_m, block_n, block_k, backend), (codes, scale, jnp.zeros((0,), x.dtype))


def _i8mm_bwd(block_m, block_n, block_k, backend, res, g):
    codes, scale, x_like = res
    dx = _backward_dx(g, codes, scale, None, 8, True, codes.shape[0], block_m, block_n, block_k, backend,
                      jnp.float32)
    return dx.astype(x_like.dtype), _no_grad(codes), _no_grad(scale)


_i8mm.defvjp(_i8mm_fwd, _i8mm_bwd)


def int8_matmul(x, codes, scale, *, block_m: int | None = None, block_n: int = 128, block_k: int = 128,
                interpret: bool = False):
    """W8A8: `quant8(x) @ (codes * scale)` with int32 accumulation, `x [M, K]`, int8 `codes [K, N]`,
    per-column `scale [1, N]`; the gradient in `x` is `g @ (codes * scale)^T` (straight-through)."""
    if scale.shape[0] != 1:
        raise ValueError(f"int8_matmul: needs one scale per column ([1, N]), got {scale.shape}")
    return by_platform(_i8mm_for, x, codes, scale, interpret=interpret, block_m=block_m, block_n=block_n,
                       block_k=block_k)


def _i8mm_for(x, codes, scale, *, backend, block_m, block_n, block_k):
    return _i8mm(x, codes, scale, block_m, block_n, block_k, backend)
