"""The decoder's projection matmuls and embedding lookups, for plain or compressed weights.

`linear(x, w, compute_dtype, contract=1)` computes `x @ w` with `w` viewed as `[K, N]` (its first
`contract` axes contracted, the result keeping the rest): for a plain array exactly
`jaxllm.ops.matmul.matmul` on that view. For a compressed weight (`jaxllm.compression.qtensor`) it
first quantizes the input activations if the weight's spec asks (token-wise dynamic ranges, or the
static EMA range the weight carries), then multiplies by the quantized weight:

- `FakeQuantWeight`: `fake_quant(w)` in f32 (straight-through gradients; training, LKD, XTC);
- `QuantizedWeight`: the integer codes. On CPU (and with `implementation="xla"`) the codes are
  dequantized and multiplied in XLA; on GPU/TPU ("auto") or with "pallas" the Pallas kernel of
  `pallas_kernels/quantized_matmul.py` multiplies int8 / packed int4 / packed 2-bit codes with
  per-group scales, and uses int8 x int8 products with per-token activation scales for symmetric
  8-bit weights and activations (W8A8).

Calibration: inside `with record_ranges() as ranges:` every static activation quantizer first
updates its range with the batch, `r <- 0.95 r + 0.05 (min, max)` (the first batch sets it), and
quantizes with the updated range, as DeepSpeed's static quantizer does in training mode; `ranges`
collects the new ranges by module name. Use it inside the traced function and return `ranges`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.compression import packing
from jaxllm.compression.qtensor import FakeQuantWeight, QuantizedWeight, QuantSpec, matrix_shape
from jaxllm.compression.quantizers import ActRange, quantize_static, quantize_tokens, update_range
from jaxllm.errors import UserError
from jaxllm.mesh import constrain
from jaxllm.ops.matmul import matmul

IMPLEMENTATIONS = ("auto", "xla", "pallas")
_state = threading.local()


@contextlib.contextmanager
def record_ranges(momentum: float = 0.95) -> Iterator[dict[str, ActRange]]:
    """Collects (and applies) EMA updates of static activation ranges while tracing a forward pass."""
    previous = getattr(_state, "recorder", None)
    ranges: dict[str, ActRange] = {}
    _state.recorder = (ranges, momentum)
    try:
        yield ranges
    finally:
        _state.recorder = previous


def quantize_input(x: Float[Array, "... k"], spec: QuantSpec, act_range: ActRange | None) -> Float[Array, "... k"]:
    """The matmul input after the spec's activation quantization (identity when `act_bits` is None)."""
    if spec.act_bits is None:
        return x
    if not spec.act_static:
        return quantize_tokens(x, spec.act_bits, spec.act_symmetric)
    if act_range is None:
        raise UserError(f"module '{spec.name}': static activation quantization needs a calibrated range")
    recorder = getattr(_state, "recorder", None)
    if recorder is not None:
        ranges, momentum = recorder
        observed = jax.lax.stop_gradient(x.astype(jnp.float32))
        act_range = update_range(act_range, jnp.min(observed), jnp.max(observed), momentum)
        ranges[spec.name] = act_range
    return quantize_static(x, jax.tree.map(jax.lax.stop_gradient, act_range), spec.act_bits, spec.act_symmetric)


def pallas_selected(implementation: str, platform: str | None = None) -> bool:
    """Whether `implementation` resolves to the Pallas kernel on `platform` (default: JAX's backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"quantized matmul: unknown implementation '{implementation}'; expected "
                        f"{', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return (platform or jax.default_backend()) in ("gpu", "tpu")
    return implementation == "pallas"


def _kernel_matmul(x2: jax.Array, w: QuantizedWeight, raw_x: jax.Array) -> jax.Array:
    from pallas_kernels import quantized_matmul as kernels

    spec = w.spec
    k, n = matrix_shape(spec, w.shape)
    interpret = jax.default_backend() == "cpu"
    scale = kernels.column_scales(w.scale, n)
    zero = None if w.zero is None else kernels.column_scales(w.zero, n)
    w8a8 = (spec.weight_bits == 8 and spec.weight_kind == "symmetric" and scale.shape[0] == 1
            and spec.act_bits == 8 and spec.act_symmetric and not spec.act_static)
    if w8a8:  # int8 x int8 with per-token activation scales; the input's quantization is straight-through
        return kernels.int8_matmul(raw_x, w.codes, scale, interpret=interpret)
    return kernels.quantized_matmul(x2, w.codes, scale, zero, bits=spec.weight_bits, signed=w.signed, k=k,
                                    interpret=interpret)


def linear(
    x: Float[Array, "... k"],
    w: Any,
    compute_dtype: Any = jnp.float32,
    contract: int = 1,
    transpose_w: bool = False,
) -> Float[Array, "... n"]:
    """`x @ w` over `w`'s first `contract` axes (or `x @ w.T` for a 2-D `w` with `transpose_w`), in f32.

    Args:
      x: `[..., K]` activations.
      w: a weight array `[*in, *out]` with `prod(in) = K`, or a compressed weight of that shape.
      compute_dtype: float32 or bfloat16 inputs, f32 accumulation (`jaxllm.ops.matmul.matmul`).
      contract: number of leading `w` axes contracted with `x`'s last axis.
      transpose_w: contract with the second axis of a 2-D `w` (a tied output head `x @ embed.T`).

    Returns:
      `[..., *out]` f32.
    """
    compressed = isinstance(w, (FakeQuantWeight, QuantizedWeight))
    if compressed:
        if not transpose_w and w.spec.contract != contract:
            raise ValueError(f"module '{w.spec.name}' was quantized for contract={w.spec.contract}, called "
                             f"with contract={contract}")
        raw_x = x
        x = quantize_input(x, w.spec, w.act_range)
        if isinstance(w, QuantizedWeight) and not transpose_w and pallas_selected(w.spec.implementation):
            k = math.prod(w.shape[:contract])
            out = _kernel_matmul(x.reshape(-1, k).astype(compute_dtype), w, raw_x.reshape(-1, k))
            return out.reshape(*x.shape[:-1], *w.shape[contract:])
        w = w.dequantize()
    if transpose_w:
        return matmul(x, w, compute_dtype, transpose_w=True)
    if w.ndim == 2 and contract == 1:
        return matmul(x, w, compute_dtype)
    k = math.prod(w.shape[:contract])
    return matmul(x, w.reshape(k, -1), compute_dtype).reshape(*x.shape[:-1], *w.shape[contract:])


def embedding_lookup(table: Any, tokens: Int[Array, "*dims"]) -> Float[Array, "... d"]:
    """Rows `table[tokens]` of a plain `[vocab, d]` table (gathered whole, unsharded) or a compressed one.

    A `QuantizedWeight` table gathers its code and scale rows and dequantizes only those (per-row
    groups, as DeepSpeed quantizes embeddings); a `FakeQuantWeight` table is fake-quantized first.
    """
    if isinstance(table, QuantizedWeight) and table.scale.shape == (table.shape[0], 1):
        codes = packing.gather_rows(table.codes, table.spec.weight_bits, tokens, table.signed)
        rows = codes.astype(jnp.float32) * jnp.take(table.scale, tokens, axis=0)
        if table.zero is not None:
            rows = rows + jnp.take(table.zero, tokens, axis=0)
        return rows
    if isinstance(table, (FakeQuantWeight, QuantizedWeight)):
        table = table.dequantize()
    # Gather from the whole table: a gather from a vocab-sharded table cannot be partitioned efficiently.
    return jnp.take(constrain(table, (None, None)), tokens, axis=0)
