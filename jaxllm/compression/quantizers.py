"""DeepSpeed's quantizers (`deepspeed/compression/utils.py`) as pure functions with straight-through gradients.

Every quantizer splits its input, in row-major order, into `groups` equal groups (`x.reshape(groups, -1)`)
and works on each group alone. With `q = 2**bits` and rounding half to even (`jnp.round`, like
`torch.round`):

| bits   | kind        | scale and codes (per group)                                    | value        |
|--------|-------------|----------------------------------------------------------------|--------------|
| 3..8   | symmetric   | `s = 2 max|x| / q`, `c = clip(round(x / s), -q/2, q/2 - 1)`     | `c s`        |
| 3..8   | asymmetric  | `s = (max - min) / q`, `z = round(min / s) s`,                 | `c s + z`    |
|        |             | `c = clip(round((x - z) / s), 0, q - 1)`                        |              |
| 2      | ternary     | `t = 0.7 mean|x|`, `a = mean(|x| where |x| > t)`, `c = sign(x) [|x| > t]` | `c a` |
| 1      | binary      | `a = mean|x|`, `c = sign(x)` (sign(0) = 0)                      | `c a`        |

The symmetric grid has one more negative level than positive ones, so the group's positive maximum
maps to `round(q/2) = q/2` and is clipped to `q/2 - 1` (a loss of one step at the top, exactly as in
DeepSpeed). Degenerate groups, where DeepSpeed divides 0 by 0, are defined here: an all-zero group
stays zero, a constant group under the asymmetric quantizer stays that constant, and a ternary group
with nothing above the threshold becomes zero.

`fake_quant(x, bits, groups, symmetric)` returns the dequantized array with the straight-through
estimator (STE) gradient `d fake_quant / dx = 1` (Bengio et al., 2013), as DeepSpeed's quantizers'
backward passes do. Activations use the same quantizers: `quantize_tokens` gives every token
(last-axis row) its own group (DeepSpeed's `range_calibration: dynamic`), and `quantize_static` one
range for the whole tensor from an exponential moving average (`range_calibration: static`, see
`update_range`).

Example::

    >>> fake_quant(jnp.array([0.3, -1.0, 0.5, 1.0]), bits=3)   # s = 2 * 1.0 / 8 = 0.25
    Array([ 0.25, -1.  ,  0.5 ,  0.75], dtype=float32)

References: ZeroQuant (Yao et al., 2022, arXiv:2206.01861); XTC (Wu et al., 2022, arXiv:2206.01859);
TernaryBERT (Zhang et al., 2020) for the 0.7 mean|x| threshold.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxllm.errors import UserError
from pallas_kernels.packing import check_bits  # the bit widths the code storage has


def check_groups(size: int, groups: object, where: str = "groups") -> int:
    """Returns `groups`, or raises UserError unless it is a positive integer dividing `size` elements."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise UserError(f"{where}: got {groups!r}; expected a positive integer")
    if size % groups:
        raise UserError(f"{where}: {groups} groups do not divide the tensor's {size} elements; use a divisor "
                        f"of {size}")
    return groups


def kind_of(bits: int, symmetric: bool = True) -> str:
    """The quantizer DeepSpeed picks for `bits`: binary (1), ternary (2), else symmetric/asymmetric."""
    bits = check_bits(bits)
    if bits == 1:
        return "binary"
    if bits == 2:
        return "ternary"
    return "symmetric" if symmetric else "asymmetric"


class GroupCodes(NamedTuple):
    """Integer codes (held in f32) of `[groups, n]` values and each group's scale and zero point.

    The dequantized value is `codes * scale + zero`; `zero` is 0 except for asymmetric quantization.
    """

    codes: Float[Array, "groups n"]
    scale: Float[Array, "groups 1"]
    zero: Float[Array, "groups 1"]


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale > 0, scale, 1.0)


def symmetric_codes(x: jax.Array, amax: jax.Array, bits: int) -> GroupCodes:
    """`x` on the symmetric grid of range `amax` (broadcastable): `s = 2 amax / q`, `c = clip(round(x / s))`."""
    q = 2.0**bits
    scale = 2.0 * amax / q
    codes = jnp.clip(jnp.round(x / _safe(scale)), -q / 2, q / 2 - 1)
    return GroupCodes(codes, scale, jnp.zeros_like(scale))


def asymmetric_codes(x: jax.Array, low: jax.Array, high: jax.Array, bits: int) -> GroupCodes:
    """`x` on the asymmetric grid of [low, high]: `s = (high - low) / q`, `z = round(low / s) s`."""
    q = 2.0**bits
    scale = (high - low) / q
    zero = jnp.where(scale > 0, jnp.round(low / _safe(scale)) * scale, low)
    codes = jnp.clip(jnp.round((x - zero) / _safe(scale)), 0, q - 1)
    return GroupCodes(codes, scale, zero)


def quantize_groups(xg: Float[Array, "groups n"], bits: int, symmetric: bool = True) -> GroupCodes:
    """Codes, scales and zero points of each row of `xg` under DeepSpeed's quantizer for `bits`."""
    kind = kind_of(bits, symmetric)
    xg = xg.astype(jnp.float32)
    if kind == "symmetric":
        return symmetric_codes(xg, jnp.max(jnp.abs(xg), axis=1, keepdims=True), bits)
    if kind == "asymmetric":
        return asymmetric_codes(xg, jnp.min(xg, axis=1, keepdims=True), jnp.max(xg, axis=1, keepdims=True), bits)
    zero = jnp.zeros((xg.shape[0], 1), jnp.float32)
    magnitude = jnp.abs(xg)
    mean = jnp.mean(magnitude, axis=1, keepdims=True)
    if kind == "binary":
        return GroupCodes(jnp.sign(xg), mean, zero)
    threshold = 0.7 * mean
    kept = magnitude > threshold
    count = jnp.sum(kept, axis=1, keepdims=True)
    alpha = jnp.where(count > 0, jnp.sum(jnp.where(kept, magnitude, 0.0), axis=1, keepdims=True)
                      / jnp.maximum(count, 1), 0.0)
    codes = (xg > threshold).astype(jnp.float32) - (xg < -threshold).astype(jnp.float32)
    return GroupCodes(codes, alpha, zero)


def dequantize_groups(g: GroupCodes) -> Float[Array, "groups n"]:
    return g.codes * g.scale + g.zero


def _fake_quant_forward(x: jax.Array, bits: int, groups: int, symmetric: bool) -> jax.Array:
    g = quantize_groups(x.reshape(groups, -1), bits, symmetric)
    return dequantize_groups(g).reshape(x.shape).astype(x.dtype)


def _straight_through(forward):
    """`forward(x, *static)` with the identity as its gradient in `x`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
    def wrapped(x, a, b, c):
        return forward(x, a, b, c)

    wrapped.defvjp(lambda x, a, b, c: (forward(x, a, b, c), None), lambda a, b, c, _, g: (g,))
    return wrapped


_fake_quant = _straight_through(_fake_quant_forward)


def fake_quant(x: Float[Array, "*dims"], bits: int, groups: int = 1, symmetric: bool = True) -> Float[Array, "*dims"]:
    """`x` quantized to `bits` in `groups` row-major groups and dequantized; gradient straight through.

    Args:
      x: any floating array; group g holds elements `[g n, (g + 1) n)` of `x.ravel()`, `n = x.size / groups`.
      bits: 1 (binary), 2 (ternary) or 3..8 (symmetric or asymmetric, per `symmetric`).
      groups: number of groups; must divide `x.size`.
      symmetric: for bits >= 3, symmetric (default) or asymmetric (min/max with a zero point).

    Returns:
      An array of `x`'s shape and dtype holding at most `2**bits` distinct values per group.
    """
    bits = check_bits(bits)
    groups = check_groups(x.size, groups)
    return _fake_quant(x, bits, groups, bool(symmetric))


def _tokens_forward(x, bits, groups, symmetric):
    xg = x.reshape(groups, -1).astype(jnp.float32)
    if symmetric:
        g = symmetric_codes(xg, jnp.max(jnp.abs(xg), axis=1, keepdims=True), bits)
    else:
        g = asymmetric_codes(xg, jnp.min(xg, axis=1, keepdims=True), jnp.max(xg, axis=1, keepdims=True), bits)
    return dequantize_groups(g).reshape(x.shape).astype(x.dtype)


_tokens_quant = _straight_through(_tokens_forward)


def quantize_tokens(x: Float[Array, "... d"], bits: int, symmetric: bool = True) -> Float[Array, "... d"]:
    """Token-wise dynamic activation quantization: each last-axis row is its own group (STE gradient).

    DeepSpeed's `range_calibration: dynamic` (`num_groups = numel / last_dim`). Activations always use
    the symmetric or asymmetric grid (also at 1 or 2 bits), as DeepSpeed's activation quantizer does.
    """
    bits = check_bits(bits, "activation bits")
    if x.size == 0:
        return x
    return _tokens_quant(x, bits, x.size // x.shape[-1], bool(symmetric))


class ActRange(NamedTuple):
    """The running (min, max) of a static activation quantizer; equal values mean "not yet seen"."""

    low: Float[Array, ""]
    high: Float[Array, ""]

    @classmethod
    def empty(cls) -> ActRange:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def update_range(r: ActRange, low: Float[Array, ""], high: Float[Array, ""], momentum: float = 0.95) -> ActRange:
    """DeepSpeed's static range update: `r <- momentum r + (1 - momentum) new`, started at the first batch.

    The range starts at the first batch's (min, max) when its two ends are still equal (DeepSpeed's
    `QuantAct` buffer test); DeepSpeed updates it only in training mode, i.e. while calibrating.
    """
    low, high = jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32)
    fresh = r.low == r.high
    start_low, start_high = jnp.where(fresh, low, r.low), jnp.where(fresh, high, r.high)
    return ActRange(momentum * start_low + (1 - momentum) * low, momentum * start_high + (1 - momentum) * high)


def _static_forward(x, low, high, bits, symmetric):
    xf = x.astype(jnp.float32)
    if symmetric:  # DeepSpeed: max(|min|, max) as the symmetric range
        g = symmetric_codes(xf, jnp.maximum(jnp.abs(low), high), bits)
    else:
        g = asymmetric_codes(xf, low, high, bits)
    return dequantize_groups(g).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _static_quant(x, low, high, bits, symmetric):
    return _static_forward(x, low, high, bits, symmetric)


_static_quant.defvjp(
    lambda x, low, high, bits, symmetric: (_static_forward(x, low, high, bits, symmetric), (low, high)),
    lambda bits, symmetric, res, g: (g, jnp.zeros_like(res[0]), jnp.zeros_like(res[1])))


def quantize_static(x: Float[Array, "*dims"], r: ActRange, bits: int, symmetric: bool = True) -> Float[Array, "*dims"]:
    """Static activation quantization with one (min, max) range for the whole tensor (STE gradient).

    Symmetric uses `max(|min|, max)` as its range; values outside the range clip to the grid's ends.
    The range gets no gradient.
    """
    bits = check_bits(bits, "activation bits")
    return _static_quant(x, r.low, r.high, bits, bool(symmetric))
