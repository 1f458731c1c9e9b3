"""DeepSpeed's quantizers against values worked out by hand from the formulas, packing, STE gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.compression import packing
from jaxllm.compression.qtensor import QuantSpec, fake_quant_weight, quantize_weight
from jaxllm.compression.quantizers import (
    ActRange,
    fake_quant,
    quantize_static,
    quantize_tokens,
    update_range,
)
from jaxllm.errors import UserError


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b, np.float32), rtol=0, atol=tol)


def test_symmetric_clips_positive_max():
    # q = 8, s = 2 * 1.0 / 8 = 0.25; x / s = [1.2, -4, 2, 4] -> [1, -4, 2, 4] -> clip to [-4, 3]
    close(fake_quant(jnp.array([0.3, -1.0, 0.5, 1.0]), bits=3), [0.25, -1.0, 0.5, 0.75])


def test_symmetric_rounds_half_to_even():
    # 4 bits, max |x| = 8 -> s = 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -8 stays (the grid's negative end)
    close(fake_quant(jnp.array([0.5, 1.5, 2.5, -8.0]), bits=4), [0.0, 2.0, 2.0, -8.0])


def test_asymmetric_groups():
    # 4 bits, 2 groups. [-0.75, 0.25]: s = 1/16, z = round(-12) s = -0.75, codes [0, 16 -> 15]
    # [0.5, 1.5]: s = 1/16, z = round(8) s = 0.5, codes [0, 15]
    x = jnp.array([-0.75, 0.25, 0.5, 1.5])
    close(fake_quant(x, bits=4, groups=2, symmetric=False), [-0.75, 0.1875, 0.5, 1.4375])


def test_asymmetric_rounds_the_zero_point():
    # 3 bits on [-0.3, 0.7]: s = 1/8, min / s = -2.4 -> z = -2 s = -0.25; (x - z) / s = [-0.4, 7.6] -> [0, 7]
    close(fake_quant(jnp.array([-0.3, 0.7]), bits=3, symmetric=False), [-0.25, 0.625])


def test_ternary():
    x = jnp.array([0.1, -0.5, 0.9, -1.2, 0.05, 0.3])
    # mean |x| = 3.05 / 6; threshold 0.7 * that = 0.35583; kept: -0.5, 0.9, -1.2 -> alpha = 2.6 / 3
    a = 2.6 / 3
    close(fake_quant(x, bits=2), [0.0, -a, a, -a, 0.0, 0.0])
    # per group: [1, -3 | 0.5, 0.1]: means 2 and 0.3, thresholds 1.4 and 0.21 -> alphas 3 and 0.5
    close(fake_quant(jnp.array([1.0, -3.0, 0.5, 0.1]), bits=2, groups=2), [0.0, -3.0, 0.5, 0.0])


def test_binary():
    close(fake_quant(jnp.array([0.5, -1.5, 0.0, 2.0]), bits=1), [1.0, -1.0, 0.0, 1.0])  # mean |x| = 1, sign(0) = 0
    close(fake_quant(jnp.array([[1.0, -3.0], [0.5, 0.5]]), bits=1, groups=2), [[2.0, -2.0], [0.5, 0.5]])


def test_degenerate_groups_stay_finite():
    close(fake_quant(jnp.zeros(4), bits=8), np.zeros(4))
    close(fake_quant(jnp.full(4, 0.3), bits=4, symmetric=False), np.full(4, 0.3))
    close(fake_quant(jnp.zeros(4), bits=2), np.zeros(4))


def test_token_wise_dynamic_activations():
    x = jnp.array([[1.0, -0.5, 0.25], [0.1, 2.0, -4.0]])
    # row 0: s = 2 / 256, x / s = [128 -> 127, -64, 32]; row 1: s = 8 / 256, x / s = [3.2 -> 3, 64, -128]
    close(quantize_tokens(x, 8), [[127 / 128, -0.5, 0.25], [3 / 32, 2.0, -4.0]])
    # asymmetric, 2 bits, row [0, 1, 3]: s = 3/4, z = 0, codes [0, 1.33 -> 1, 4 -> 3]
    close(quantize_tokens(jnp.array([[0.0, 1.0, 3.0]]), 2, symmetric=False), [[0.0, 0.75, 2.25]])


def test_static_range_ema_and_quantization():
    r = update_range(ActRange.empty(), -1.0, 2.0)  # the first batch sets the range
    close([r.low, r.high], [-1.0, 2.0])
    r = update_range(r, -3.0, 4.0)  # 0.95 r + 0.05 new
    close([r.low, r.high], [-1.1, 2.1])
    # symmetric 4 bits on (-2, 1): range max(|-2|, 1) = 2, s = 0.25: [1.2, -12, 7.6] -> [1, -8, 7]
    r = ActRange(jnp.float32(-2), jnp.float32(1))
    close(quantize_static(jnp.array([0.3, -3.0, 1.9]), r, 4), [0.25, -2.0, 1.75])
    # asymmetric 3 bits on (-1, 3): s = 0.5, z = -1: (x + 1) / s = [9, -2, 3.2] -> [7, 0, 3]
    close(quantize_static(jnp.array([3.5, -2.0, 0.6]), ActRange(jnp.float32(-1), jnp.float32(3)), 3, symmetric=False),
          [2.5, -1.0, 0.5])


def test_straight_through_gradients():
    x = jnp.array([0.3, -1.0, 0.5, 1.0, 2.2, -0.1])
    c = jnp.arange(6.0) + 1
    for fn in (lambda v: fake_quant(v, 3, 2), lambda v: fake_quant(v, 2), lambda v: fake_quant(v, 1),
               lambda v: fake_quant(v, 5, symmetric=False), lambda v: quantize_tokens(v.reshape(2, 3), 8).ravel()):
        close(jax.grad(lambda v, fn=fn: jnp.sum(fn(v) * c))(x), c)
    r = ActRange(jnp.float32(-1.0), jnp.float32(1.0))
    gx, gr = jax.grad(lambda v, r: jnp.sum(quantize_static(v, r, 8) * c), argnums=(0, 1))(x, r)
    close(gx, c)
    close([gr.low, gr.high], [0.0, 0.0])


def test_weight_groups_follow_pytorch_output_rows():
    # A jaxllm weight [in=2, out=4]; DeepSpeed groups its [out, in] transpose: 2 groups = output columns {0, 1}, {2, 3}.
    w = jnp.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 6.0, -8.0]])
    spec = QuantSpec("w", weight_bits=3, weight_groups=2)
    # group {1, -1, 2, 0.5}: s = 0.5 -> [2, -2, 4 -> 3, 1]; group {3, 6, 4, -8}: s = 2 -> [1.5 -> 2, 3, 2, -4]
    expected = [[1.0, 1.5, 4.0, 4.0], [-1.0, 0.5, 6.0, -8.0]]
    close(fake_quant_weight(w, spec), expected)
    stored = quantize_weight(w, spec)
    assert stored.scale.shape == (1, 2) and stored.codes.dtype == jnp.uint8  # 3 bits -> packed nibbles
    close(stored.dequantize(), expected)


@pytest.mark.parametrize("bits,groups,symmetric,shape", [
    (8, 4, True, (6, 8)), (4, 16, True, (6, 8)), (5, 2, False, (7, 4)), (3, 8, False, (5, 8)), (2, 8, True, (9, 8)),
    (1, 1, True, (3, 5)),
])
def test_storage_equals_fake_quant_bitwise(bits, groups, symmetric, shape):
    w = jax.random.normal(jax.random.key(bits), shape)
    spec = QuantSpec("w", weight_bits=bits, weight_groups=groups, weight_symmetric=symmetric)
    q = quantize_weight(w, spec)
    assert np.array_equal(np.asarray(q.dequantize()), np.asarray(fake_quant_weight(w, spec)))
    assert q.codes.shape[0] == packing.packed_rows(shape[0], bits)


def test_embedding_layout_groups_rows():
    table = jax.random.normal(jax.random.key(0), (5, 4))
    spec = QuantSpec("embed", weight_bits=8, weight_groups=5, transposed=False)
    q = quantize_weight(table, spec)
    assert q.scale.shape == (5, 1)
    rows = jnp.stack([fake_quant(table[i], 8) for i in range(5)])
    assert np.array_equal(np.asarray(q.dequantize()), np.asarray(rows))


def test_pack_hand_values():
    # 4-bit signed [1, -2, 7]: 0x1E, then 7 with a zero pad -> 0x70; even index in the high nibble
    np.testing.assert_array_equal(packing.pack_codes(jnp.array([[1], [-2], [7]]), 4, True), [[0x1E], [0x70]])
    # 2-bit fields, four per byte, first in the top bits: [1, -1, 0, 1] -> 01 11 00 01
    np.testing.assert_array_equal(packing.pack_codes(jnp.array([1, -1, 0, 1]), 2, True), [0b01110001])
    # unsigned 4-bit [15, 3] -> 0xF3
    np.testing.assert_array_equal(packing.pack_codes(jnp.array([15, 3]), 4, False), [0xF3])


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (6, False), (4, True), (4, False), (3, True),
                                         (2, True), (1, True)])
def test_pack_round_trip(bits, signed):
    rng = np.random.default_rng(bits)
    if bits <= 2:
        low, high = -1, 1
    else:
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    for rows in (1, 5, 8):  # odd row counts leave a partly filled last byte
        codes = rng.integers(low, high + 1, size=(rows, 3))
        stored = packing.pack_codes(jnp.asarray(codes), bits, signed)
        assert stored.shape == (packing.packed_rows(rows, bits), 3)
        np.testing.assert_array_equal(packing.unpack_codes(stored, bits, rows, signed), codes)
        index = jnp.asarray([[rows - 1, 0], [rows // 2, rows - 1]])
        np.testing.assert_array_equal(packing.gather_rows(stored, bits, index, signed), codes[np.asarray(index)])


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, "8"])
def test_bits_outside_1_to_8_are_rejected(bits):
    with pytest.raises(UserError, match="expected an integer from 1 to 8"):
        fake_quant(jnp.ones(4), bits)
    with pytest.raises(UserError, match="from 1 to 8"):
        quantize_tokens(jnp.ones((2, 4)), bits)


def test_groups_must_divide_the_tensor():
    with pytest.raises(UserError, match="3 groups do not divide the tensor's 8 elements"):
        fake_quant(jnp.ones(8), 8, groups=3)
    with pytest.raises(UserError, match="positive integer"):
        fake_quant(jnp.ones(8), 8, groups=0)
    # Divides the tensor, but groups would straddle output channels of the [out=4, in=3] view.
    with pytest.raises(UserError, match="'blocks.0.mlp.w_in' \\(3, 4\\): 6 weight groups straddle its 4 output rows"):
        quantize_weight(jnp.ones((3, 4)), QuantSpec("blocks.0.mlp.w_in", weight_bits=8, weight_groups=6))
