"""The Pallas quantized matmuls (interpret mode) against dequantize-then-matmul, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.compression.qtensor import QuantSpec, quantize_weight
from jaxllm.compression.quantizers import quantize_tokens
from jaxllm.ops.linear import linear
from pallas_kernels.quantized_matmul import column_scales, int8_matmul, quantized_matmul
from tests.conftest import PALLAS_INTERPRET

# Tiny blocks so that every shape below spans several blocks and none divides them. Compiled for a GPU
# (JAXLLM_PALLAS_INTERPRET=0), Triton's dots need tiles of at least 16.
BLOCKS = (dict(block_m=8, block_n=8, block_k=4, interpret=True) if PALLAS_INTERPRET
          else dict(block_m=16, block_n=16, block_k=16, interpret=False))


def weight(bits, groups, symmetric, k, n, seed=0):
    w = jax.random.normal(jax.random.key(seed), (k, n))
    return quantize_weight(w, QuantSpec("w", weight_bits=bits, weight_groups=groups, weight_symmetric=symmetric))


@pytest.mark.parametrize("bits,groups,symmetric,m,k,n", [
    (8, 3, True, 5, 37, 21),  # int8, 3 bands of output channels
    (4, 18, False, 3, 30, 9),  # asymmetric packed int4 (zero points), each output channel in 2 groups along K
    (2, 9, True, 2, 26, 9),  # ternary, four codes per byte
])
def test_weight_only_kernel_matches_dequantized_matmul(bits, groups, symmetric, m, k, n):
    q = weight(bits, groups, symmetric, k, n)
    x = jax.random.normal(jax.random.key(1), (m, k))
    zero = None if q.zero is None else column_scales(q.zero, n)

    def f(x):
        return quantized_matmul(x, q.codes, column_scales(q.scale, n), zero, bits=bits, signed=q.signed, k=k, **BLOCKS)

    w = q.dequantize()
    out, vjp = jax.vjp(f, x)
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(2), (m, n))
    np.testing.assert_allclose(vjp(g)[0], g @ w.T, rtol=1e-5, atol=1e-5)


def test_bf16_activations():
    q = weight(8, 1, True, 19, 10)
    x = jax.random.normal(jax.random.key(1), (3, 19)).astype(jnp.bfloat16)
    out = quantized_matmul(x, q.codes, column_scales(q.scale, 10), bits=8, signed=True, k=19, **BLOCKS)
    ref = jnp.dot(x, q.dequantize().astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2)


def test_int8_x_int8_with_per_token_scales():
    q = weight(8, 11, True, 23, 11)  # one scale per output channel
    x = jax.random.normal(jax.random.key(3), (6, 23)) * jnp.arange(1, 7)[:, None]
    out, vjp = jax.vjp(lambda x: int8_matmul(x, q.codes, q.scale, **BLOCKS), x)
    np.testing.assert_allclose(out, quantize_tokens(x, 8) @ q.dequantize(), rtol=1e-5, atol=1e-4)
    g = jax.random.normal(jax.random.key(4), (6, 11))
    np.testing.assert_allclose(vjp(g)[0], g @ q.dequantize().T, rtol=1e-5, atol=1e-5)  # straight through


def test_linear_dispatches_to_the_kernel():
    """A 3-D attention weight [d, heads, head_dim] through `linear`: XLA path == Pallas path."""
    w = jax.random.normal(jax.random.key(5), (12, 2, 3))
    spec = QuantSpec("blocks.0.attn.wq", weight_bits=4, weight_groups=6, act_bits=8)
    x = jax.random.normal(jax.random.key(6), (2, 3, 12))
    xla = linear(x, quantize_weight(w, spec))
    pallas = linear(x, quantize_weight(w, QuantSpec(**{**spec.__dict__, "implementation": "pallas"})))
    assert xla.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
