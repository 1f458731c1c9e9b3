"""The compressed side of `jaxllm.ops.linear`: activation quantization, calibration, kernel choice.

A compressed weight (`jaxllm.compression.qtensor`) implements `jaxllm.ops.linear.Weight`: before it
multiplies, it quantizes the input activations if its spec asks (token-wise dynamic ranges, or the
static EMA range the weight carries), then multiplies by the quantized weight:

- `FakeQuantWeight`: `fake_quant(w)` in f32 (straight-through gradients; training, LKD, XTC);
- `QuantizedWeight`: the integer codes. On GPU/TPU ("auto") or with "pallas" (`jaxllm.ops.dispatch`) the
  Pallas kernel of `pallas_kernels/quantized_matmul.py` multiplies int8 / packed int4 / packed 2-bit codes
  with per-group scales, and uses int8 x int8 products with per-token activation scales for symmetric
  8-bit weights and activations (W8A8). In XLA (on CPU, with `implementation="xla"`, and in programs
  compiled ahead of time for a TPU or GPU), a weight without zero points whose input is quantized
  token-wise and symmetrically multiplies integers, `integer_matmul` (s8 x s8 -> s32 dots, then the
  scales); any other is dequantized and multiplied in floating point.

Calibration: inside `with record_ranges() as ranges:` every static activation quantizer first
updates its range with the batch, `r <- 0.95 r + 0.05 (min, max)` (the first batch sets it), and
quantizes with the updated range, as DeepSpeed's static quantizer does in training mode; `ranges`
collects the new ranges by module name. Use it inside the traced function and return `ranges`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

from jaxllm.compression.quantizers import ActRange, symmetric_codes

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


def active_recorder() -> tuple[dict[str, ActRange], float] | None:
    """(ranges collected so far, momentum) of the innermost `record_ranges`, or None outside one."""
    return getattr(_state, "recorder", None)


def _column_scales(scale: Float[Array, "rs cs"], n: int) -> Float[Array, "rs n"]:
    """Each of the `Cs` block scales repeated over its `n / Cs` output columns."""
    return jnp.repeat(scale.astype(jnp.float32), n // scale.shape[1], axis=1)


def _integer_forward(x: jax.Array, codes: jax.Array, scale: jax.Array, act_bits: int) -> jax.Array:
    m, k = x.shape
    rows = scale.shape[0]
    xf = x.astype(jnp.float32)
    # The codes quantize_tokens rounds to (its value is codes * token scale), kept as integers.
    tokens = symmetric_codes(xf, jnp.max(jnp.abs(xf), axis=1, keepdims=True), act_bits)
    x_codes = tokens.codes.astype(jnp.int8)
    column_scales = _column_scales(scale, codes.shape[1])
    if rows == 1:  # one scale per column block: a single [M, K] x [K, N] integer dot
        acc = jax.lax.dot_general(x_codes, codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        weighted = acc.astype(jnp.float32) * column_scales
    else:  # scales also change along K: one integer dot per band of K / Rs rows, batched over the bands
        band = k // rows
        acc = jax.lax.dot_general(x_codes.reshape(m, rows, band), codes.reshape(rows, band, -1),
                                  (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)  # [Rs, M, N]
        weighted = jnp.sum(acc.astype(jnp.float32) * column_scales[:, None, :], axis=0)
    return weighted * tokens.scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _integer_matmul(x, codes, scale, act_bits):
    return _integer_forward(x, codes, scale, act_bits)


def _integer_fwd(x, codes, scale, act_bits):
    return _integer_forward(x, codes, scale, act_bits), (codes, scale, jnp.zeros((0,), x.dtype))


def _integer_bwd(act_bits, residuals, g):
    codes, scale, x_like = residuals
    k, n = codes.shape
    weight = codes.astype(jnp.float32) * jnp.repeat(_column_scales(scale, n), k // scale.shape[0], axis=0)
    return (g @ weight.T).astype(x_like.dtype), None, None


_integer_matmul.defvjp(_integer_fwd, _integer_bwd)


def integer_matmul(x: Float[Array, "m k"], codes: Int8[Array, "k n"], scale: Float[Array, "rs cs"],
                   act_bits: int = 8) -> Float[Array, "m n"]:
    """`quantize_tokens(x, act_bits) @ (codes * scale)` computed on integers (ZeroQuant's W8A8 GEMM).

    Each row (token) of `x` is quantized symmetrically, `x = c_x s_x` with int8 codes `c_x` and one
    f32 scale `s_x` per row; the weight is int8 `codes [K, N]` with a `[Rs, Cs]` grid of block scales
    `s_w` (each over `K / Rs` rows and `N / Cs` columns, `qtensor.QuantizedWeight`'s layout). Then

        out[m, n] = s_x[m] * sum_r s_w[r, n] * sum_{k in band r} c_x[m, k] c_w[k, n]

    where the inner sums are int8 x int8 -> int32 dots (exact while `K / Rs < 2**17`), so neither
    operand is converted to floating point before its dot. Equal, up to f32 rounding, to the
    dequantize-then-multiply product. The gradient in `x` is straight-through, `g @ (codes * scale)^T`;
    the stored codes and scales get none (as in the Pallas kernel: they are not trained).
    """
    if codes.dtype != jnp.int8:
        raise ValueError(f"integer_matmul: needs int8 codes, got {codes.dtype}")
    if x.shape[1] != codes.shape[0] or codes.shape[0] % scale.shape[0] or codes.shape[1] % scale.shape[1]:
        raise ValueError(f"integer_matmul: x {x.shape}, codes {codes.shape} and scales {scale.shape} do not agree")
    return _integer_matmul(x, codes, scale, int(act_bits))
