"""`jaxllm.ops.linear`: plain weights are the jnp product; any other weight is asked through the protocol."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.compression.qtensor import FakeQuantWeight, QuantSpec, quantize_weight
from jaxllm.ops.linear import Weight, embedding_lookup, linear


def test_plain_weight_is_the_jnp_product():
    x = jax.random.normal(jax.random.key(0), (2, 3, 12))
    w = jax.random.normal(jax.random.key(1), (12, 2, 5))  # [d, heads, head_dim]: K = 12
    np.testing.assert_allclose(linear(x, w), jnp.einsum("btk,khd->bthd", x, w), rtol=1e-5, atol=1e-5)
    wo = w.reshape(2, 6, 10)  # [heads, head_dim, d]: K = 12 over two axes
    np.testing.assert_allclose(linear(x, wo, contract=2), x @ wo.reshape(12, 10), rtol=1e-5, atol=1e-5)
    table = jax.random.normal(jax.random.key(2), (7, 12))
    np.testing.assert_allclose(linear(x, table, transpose_w=True), x @ table.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(embedding_lookup(table, jnp.array([[3, 0, 6]])), table[jnp.array([[3, 0, 6]])])


@pytest.mark.parametrize("make", [
    lambda w, spec: FakeQuantWeight(w, spec),
    lambda w, spec: quantize_weight(w, spec),  # QuantizedWeight: integer codes, XLA on CPU
], ids=["fake_quant", "quantized"])
def test_quantized_weight_goes_through_the_protocol(make):
    w = jax.random.normal(jax.random.key(3), (12, 6))
    q = make(w, QuantSpec("w", weight_bits=4, weight_groups=6, implementation="xla"))
    assert isinstance(q, Weight) and not isinstance(w, Weight)
    x = jax.random.normal(jax.random.key(4), (2, 3, 12))
    ref = q.dequantize()
    assert not np.allclose(ref, w)  # the protocol, not the f32 weight, decides the product
    np.testing.assert_array_equal(linear(x, q), linear(x, ref))
    tokens = jnp.array([[11, 0], [5, 5]])
    np.testing.assert_allclose(embedding_lookup(q, tokens), ref[tokens], rtol=1e-6, atol=1e-6)
