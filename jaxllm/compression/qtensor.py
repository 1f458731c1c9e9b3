"""Compressed weights as pytrees that implement `jaxllm.ops.linear.Weight` (the models' matmul protocol).

A decoder weight can be a plain array (no compression), a `FakeQuantWeight` (f32 master weight,
quantized in the forward pass with a straight-through gradient: quantization-aware training, LKD and
XTC) or a `QuantizedWeight` (integer codes and per-group scales: the compressed checkpoint and
inference). Both carry a static `QuantSpec` (bits, groups, activation quantization, module name) and,
for static activation ranges, an `ActRange` leaf. A weight that is not compressed keeps its array, so
an uncompressed model's parameter tree and numerics are unchanged.

Layout. A weight of shape `[*in, *out]` contracts its first `spec.contract` axes, so its matmul view
is `[K, N]`. DeepSpeed groups a Linear weight in PyTorch's `[out, in]` order, i.e. over the transpose
of that view (`spec.transposed`), and an embedding table `[vocab, d]` as it is, one group per row.
The codes are stored in the `[K, N]` view (packed along K, `jaxllm.compression.packing`) and the
scales (and zero points) as a `[Rs, Cs]` grid of blocks over it: each scale covers `K / Rs` rows and
`N / Cs` columns. With G groups and DeepSpeed's grouping this is `[1, G]` when G divides the output
features (each group a band of whole output channels), `[G / N, N]` when G is a multiple of them
(each output channel split along K), and `[vocab, 1]` for an embedding. Other group counts straddle
output channels and cannot be stored as blocks; they are rejected.

Dequantizing the stored codes reproduces `fake_quant` of the same weight bit for bit, so a model
trained or distilled with `FakeQuantWeight`s behaves the same after conversion to `QuantizedWeight`s.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.compression import packing
from jaxllm.compression.linear import active_recorder, integer_matmul
from jaxllm.compression.quantizers import (
    ActRange,
    GroupCodes,
    check_bits,
    check_groups,
    fake_quant,
    kind_of,
    quantize_groups,
    quantize_static,
    quantize_tokens,
    update_range,
)
from jaxllm.errors import UserError
from jaxllm.ops.dispatch import dispatch, kernel_mesh, logical_spec, shard_kernel
from jaxllm.ops.linear import embedding_lookup, linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSettings:
    """What compression does to a weight and its input activations (a rule's settings, a module's spec).

    weight_bits: 1..8 or None (weight not quantized); weight_groups: DeepSpeed's `quantize_groups`.
    weight_symmetric: symmetric or asymmetric for 3..8 bits.
    act_bits: 1..8 or None (input activations not quantized); act_symmetric; act_static: one EMA range
      (`range_calibration: static`) instead of token-wise ranges (`dynamic`).
    """

    weight_bits: int | None = None
    weight_groups: int = 1
    weight_symmetric: bool = True
    act_bits: int | None = None
    act_symmetric: bool = True
    act_static: bool = False


@dataclasses.dataclass(frozen=True)
class QuantSpec(QuantSettings):
    """How one module is compressed (`QuantSettings` and where they apply). Static (hashable): it lives in
    the pytree's structure.

    name: the module's parameter path (`blocks.0.attn.wq`), used in messages and calibration records.
    contract: how many leading weight axes the matmul contracts (`K` = their product).
    transposed: DeepSpeed groups the transpose of the `[K, N]` view (Linear weights; not embeddings).
    implementation: "auto" (Pallas kernel on GPU/TPU, XLA on CPU), "xla" or "pallas".
    """

    name: str
    contract: int = 1
    transposed: bool = True
    implementation: str = "auto"

    @property
    def weight_kind(self) -> str | None:
        return None if self.weight_bits is None else kind_of(self.weight_bits, self.weight_symmetric)

    def validate(self, shape: tuple[int, ...]) -> None:
        """Raises UserError when the bits, groups or layout cannot apply to a weight of `shape`."""
        if not 1 <= self.contract < len(shape):
            raise UserError(f"module '{self.name}': cannot contract {self.contract} axes of a {shape} weight")
        if self.weight_bits is not None:
            check_bits(self.weight_bits, f"module '{self.name}': weight bits")
            check_groups(math.prod(shape), self.weight_groups, f"module '{self.name}' {tuple(shape)}: weight groups")
            scale_grid(self, shape)
        if self.act_bits is not None:
            check_bits(self.act_bits, f"module '{self.name}': activation bits")


def matrix_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, int]:
    """The `[K, N]` matmul view of a weight."""
    return math.prod(shape[: spec.contract]), math.prod(shape[spec.contract:])


def scale_grid(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, int]:
    """`(Rs, Cs)`: the scale blocks over the `[K, N]` view for DeepSpeed's grouping (see the module doc)."""
    k, n = matrix_shape(spec, shape)
    rows, cols = (n, k) if spec.transposed else (k, n)  # DeepSpeed's view
    groups = spec.weight_groups
    if rows % groups == 0:  # each group is rows / groups whole rows of DeepSpeed's view
        grid = (groups, 1)
    elif groups % rows == 0 and cols % (groups // rows) == 0:  # each row split into groups / rows pieces
        grid = (rows, groups // rows)
    else:
        raise UserError(
            f"module '{spec.name}' {tuple(shape)}: {groups} weight groups straddle its {rows} output rows of {cols}; "
            f"use a divisor of {rows}, or a multiple of {rows} that divides {rows * cols}")
    return (grid[1], grid[0]) if spec.transposed else grid


def _deepspeed_view(spec: QuantSpec, w: jax.Array) -> jax.Array:
    k, n = matrix_shape(spec, w.shape)
    m = w.reshape(k, n)
    return m.T if spec.transposed else m


def _from_deepspeed_view(spec: QuantSpec, m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return (m.T if spec.transposed else m).reshape(shape)


def fake_quant_weight(w: Float[Array, "*dims"], spec: QuantSpec) -> Float[Array, "*dims"]:
    """`w` fake-quantized with DeepSpeed's grouping (over PyTorch's `[out, in]` order for Linears)."""
    if spec.weight_bits is None:
        return w
    m = fake_quant(_deepspeed_view(spec, w), spec.weight_bits, spec.weight_groups, spec.weight_symmetric)
    return _from_deepspeed_view(spec, m, w.shape)


def expand_blocks(grid: Float[Array, "rs cs"], rows: int, cols: int) -> Float[Array, "rows cols"]:
    """A `[Rs, Cs]` block grid repeated to `[rows, cols]`."""
    return jnp.repeat(jnp.repeat(grid, rows // grid.shape[0], axis=0), cols // grid.shape[1], axis=1)


class _CompressedWeight(abc.ABC):
    """What both compressed weights share: `[...]` returns the weight itself, and `jaxllm.ops.linear.Weight`
    with the spec's activation quantization in front of a product with the dequantized weight."""

    spec: QuantSpec
    act_range: ActRange | None

    def __getitem__(self, index: Any) -> Any:  # `variable[...]` in modules returns the weight itself
        if index is not Ellipsis:
            raise TypeError(f"compressed weight '{self.spec.name}' supports only [...] indexing")
        return self

    @abc.abstractmethod
    def dequantize(self) -> jax.Array:
        """The f32 weight in its own shape, as the model would hold it uncompressed."""

    def matmul(self, x: Float[Array, "... k"], compute_dtype: Any, contract: int,
               transpose_w: bool) -> Float[Array, "... n"]:
        """`linear(x, self, ...)`: the input quantized as the spec says, then multiplied (see `_product`)."""
        if not transpose_w and self.spec.contract != contract:
            raise ValueError(f"module '{self.spec.name}' was quantized for contract={self.spec.contract}, called "
                             f"with contract={contract}")
        return self._product(self.quantize_input(x), x, compute_dtype, contract, transpose_w)

    def quantize_input(self, x: Float[Array, "... k"]) -> Float[Array, "... k"]:
        """The matmul input after the spec's activation quantization (identity when `act_bits` is None);
        inside `record_ranges` a static range first takes its EMA update from this batch."""
        spec, act_range = self.spec, self.act_range
        if spec.act_bits is None:
            return x
        if not spec.act_static:
            return quantize_tokens(x, spec.act_bits, spec.act_symmetric)
        if act_range is None:
            raise UserError(f"module '{spec.name}': static activation quantization needs a calibrated range")
        recorder = active_recorder()
        if recorder is not None:
            ranges, momentum = recorder
            observed = jax.lax.stop_gradient(x.astype(jnp.float32))
            act_range = update_range(act_range, jnp.min(observed), jnp.max(observed), momentum)
            ranges[spec.name] = act_range
        return quantize_static(x, jax.tree.map(jax.lax.stop_gradient, act_range), spec.act_bits, spec.act_symmetric)

    def _product(self, x: jax.Array, raw_x: jax.Array, compute_dtype: Any, contract: int,
                 transpose_w: bool) -> jax.Array:
        """`x` (quantized input; `raw_x` before quantization) times the dequantized weight."""
        return linear(x, self.dequantize(), compute_dtype, contract, transpose_w)

    def lookup(self, tokens: Int[Array, "*dims"]) -> Float[Array, "... d"]:
        """Rows of the dequantized table."""
        return embedding_lookup(self.dequantize(), tokens)


@jax.tree_util.register_pytree_node_class
class FakeQuantWeight(_CompressedWeight):
    """An f32 weight that `linear` fake-quantizes in the forward pass (STE gradients reach `w`)."""

    def __init__(self, w: jax.Array, spec: QuantSpec, act_range: ActRange | None = None):
        self.w, self.spec, self.act_range = w, spec, act_range

    def tree_flatten(self):
        return (self.w, self.act_range), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(children[0], spec, children[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    def dequantize(self) -> jax.Array:
        return fake_quant_weight(self.w, self.spec)

    def __repr__(self) -> str:
        return f"FakeQuantWeight({self.spec.name}, shape={self.shape}, w{self.spec.weight_bits}a{self.spec.act_bits})"


@jax.tree_util.register_pytree_node_class
class QuantizedWeight(_CompressedWeight):
    """Integer codes of a weight in its `[K, N]` view, packed along K, with block scales and zero points.

    codes: `[packing.packed_rows(K, bits), N]` int8 (symmetric/ternary/binary at 8 bits), uint8 otherwise.
    scale, zero: `[Rs, Cs]` f32 (`zero` is None unless asymmetric). `shape`: the weight's own shape.
    """

    def __init__(self, codes, scale, zero, act_range, spec: QuantSpec, shape: tuple[int, ...]):
        self.codes, self.scale, self.zero, self.act_range = codes, scale, zero, act_range
        self.spec, self._shape = spec, tuple(shape)

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero, self.act_range), (self.spec, self._shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def signed(self) -> bool:
        return self.spec.weight_kind != "asymmetric"

    def int_codes(self) -> jax.Array:
        """The codes unpacked to `[K, N]` (int8, or uint8 when asymmetric)."""
        k, _ = matrix_shape(self.spec, self._shape)
        return packing.unpack_codes(self.codes, self.spec.weight_bits, k, self.signed)

    def dequantize(self) -> jax.Array:
        """The f32 weight `codes * scale (+ zero)` in its own shape; equals `fake_quant_weight` bitwise."""
        k, n = matrix_shape(self.spec, self._shape)
        codes = self.int_codes().astype(jnp.float32)
        w = codes * expand_blocks(self.scale, k, n)
        if self.zero is not None:
            w = w + expand_blocks(self.zero, k, n)
        return w.reshape(self._shape)

    @property
    def integer_inputs(self) -> bool:
        """Whether XLA multiplies integers (`integer_matmul`): codes without zero points, inputs quantized
        token-wise on the symmetric grid (W8A8, W4A8, ternary/binary weights with A8)."""
        spec = self.spec
        return self.zero is None and spec.act_bits is not None and spec.act_symmetric and not spec.act_static

    def _product(self, x: jax.Array, raw_x: jax.Array, compute_dtype: Any, contract: int,
                 transpose_w: bool) -> jax.Array:
        """The Pallas kernel on the integer codes where the spec's implementation selects it ("auto": when
        the program is compiled for a GPU or TPU), else XLA: integer dots on the codes when `integer_inputs`,
        else the dequantized weight in floating point."""
        dequantized = super()._product
        if transpose_w:  # the kernel contracts the codes' K rows only
            return dequantized(x, raw_x, compute_dtype, contract, transpose_w)
        k = math.prod(self._shape[:contract])

        def kernel(x, raw_x):
            out = self._kernel_matmul(x.reshape(-1, k).astype(compute_dtype), raw_x.reshape(-1, k))
            return out.reshape(*x.shape[:-1], *self._shape[contract:])

        def reference(x, raw_x):
            if self.integer_inputs:
                out = integer_matmul(raw_x.reshape(-1, k), self.int_codes(), self.scale, self.spec.act_bits)
                return out.reshape(*raw_x.shape[:-1], *self._shape[contract:]).astype(jnp.float32)
            return dequantized(x, raw_x, compute_dtype, contract, transpose_w).astype(jnp.float32)

        return dispatch("quantized matmul", self.spec.implementation, kernel, reference, x, raw_x)

    def _kernel_matmul(self, x2: jax.Array, raw_x: jax.Array) -> jax.Array:
        """`[M, K] @ [K, N]` by the kernels; under a mesh each device takes its rows of M and columns of N."""
        from pallas_kernels import quantized_matmul as kernels

        spec = self.spec
        k, n = matrix_shape(spec, self._shape)
        scale = kernels.column_scales(self.scale, n)
        zero = None if self.zero is None else kernels.column_scales(self.zero, n)
        w8a8 = (spec.weight_bits == 8 and spec.weight_kind == "symmetric" and scale.shape[0] == 1
                and spec.act_bits == 8 and spec.act_symmetric and not spec.act_static)

        def run(x2, raw_x, codes, scale, zero):
            if w8a8:  # int8 x int8 with per-token activation scales; the input's quantization is straight-through
                return kernels.int8_matmul(raw_x, codes, scale)
            return kernels.quantized_matmul(x2, codes, scale, zero, bits=spec.weight_bits, signed=self.signed, k=k)

        args = (x2, raw_x, self.codes, scale, zero)
        mesh = kernel_mesh()
        if mesh is None:
            return run(*args)
        rows = logical_spec(mesh, ("batch", None), x2.shape)
        cols = logical_spec(mesh, (None, "mlp"), (1, n))
        out = logical_spec(mesh, ("batch", "mlp"), (x2.shape[0], n))
        return shard_kernel(run, mesh, (rows, rows, cols, cols, None if zero is None else cols), out)(*args)

    def lookup(self, tokens: Int[Array, "*dims"]) -> Float[Array, "... d"]:
        """Rows of the table. Per-row scales (DeepSpeed's embedding groups) gather the code and scale rows
        and dequantize only those; any other grouping dequantizes the whole table first."""
        if self.scale.shape != (self._shape[0], 1):
            return super().lookup(tokens)
        codes = packing.gather_rows(self.codes, self.spec.weight_bits, tokens, self.signed)
        rows = codes.astype(jnp.float32) * jnp.take(self.scale, tokens, axis=0)
        if self.zero is not None:
            rows = rows + jnp.take(self.zero, tokens, axis=0)
        return rows

    def nbytes(self) -> int:
        leaves = [self.codes, self.scale, self.zero] + ([] if self.act_range is None else list(self.act_range))
        return sum(int(x.size) * x.dtype.itemsize for x in leaves if x is not None)

    def __repr__(self) -> str:
        spec = self.spec
        return f"QuantizedWeight({spec.name}, shape={self._shape}, {spec.weight_kind} w{spec.weight_bits})"


def _grid_codes(spec: QuantSpec, w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Codes in the `[K, N]` view and the scale/zero block grids, from DeepSpeed's groups."""
    k, n = matrix_shape(spec, w.shape)
    view = _deepspeed_view(spec, w)
    g: GroupCodes = quantize_groups(view.reshape(spec.weight_groups, -1), spec.weight_bits, spec.weight_symmetric)
    codes = _from_deepspeed_view(spec, g.codes.reshape(view.shape), (k, n))
    rs, cs = scale_grid(spec, w.shape)
    # Group order is row-major over DeepSpeed's view; lay the per-group values out as its block grid.
    grid_view = (cs, rs) if spec.transposed else (rs, cs)

    def blocks(values):
        grid = values.reshape(grid_view)
        return grid.T if spec.transposed else grid

    return codes, blocks(g.scale), blocks(g.zero)


def quantize_weight(w: Float[Array, "*dims"], spec: QuantSpec, act_range: ActRange | None = None) -> Any:
    """Integer storage of `w` under `spec` (a `QuantizedWeight`), or a `FakeQuantWeight` holding `w` when
    only its input activations are quantized (nothing to store as integers)."""
    spec.validate(tuple(w.shape))
    if spec.weight_bits is None:
        return FakeQuantWeight(w, spec, act_range)
    codes, scale, zero = _grid_codes(spec, w.astype(jnp.float32))
    stored = packing.pack_codes(codes, spec.weight_bits, signed=spec.weight_kind != "asymmetric")
    return QuantizedWeight(stored, scale, zero if spec.weight_kind == "asymmetric" else None, act_range, spec,
                           tuple(w.shape))


def is_compressed(x: Any) -> bool:
    return isinstance(x, (FakeQuantWeight, QuantizedWeight))
