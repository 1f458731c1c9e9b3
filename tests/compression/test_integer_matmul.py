"""The XLA path of a quantized weight with token-wise quantized inputs multiplies integers (s8 x s8 -> s32)
and equals dequantize-then-matmul in floating point."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.compression.linear import integer_matmul
from jaxllm.compression.qtensor import QuantSpec, quantize_weight
from jaxllm.compression.quantizers import quantize_tokens
from jaxllm.ops.linear import linear


def weight(shape, bits, groups, act_bits=8, seed=0, **spec):
    w = jax.random.normal(jax.random.key(seed), shape)
    return quantize_weight(w, QuantSpec("blocks.0.attn.wq", weight_bits=bits, weight_groups=groups,
                                        act_bits=act_bits, implementation="xla", **spec))


@pytest.mark.parametrize("bits,groups,shape,contract", [
    (8, 3, (37, 21), 1),  # int8, 3 bands of output channels: scales [1, 3]
    (8, 42, (36, 21), 1),  # each output channel split in 2 along K: scales [2, 21], one dot per band
    (4, 6, (12, 2, 3), 1),  # packed int4, a 3-D attention weight [d, heads, head_dim]
    (2, 1, (4, 5, 16), 2),  # ternary, an output projection contracting [heads, head_dim]
])
def test_integer_product_equals_dequantize_then_float_matmul(bits, groups, shape, contract):
    q = weight(shape, bits, groups, contract=contract)
    assert q.integer_inputs
    k = int(np.prod(shape[:contract]))
    x = jax.random.normal(jax.random.key(1), (2, 5, k)) * jnp.arange(1, 6)[None, :, None]  # rows of unlike ranges
    reference = quantize_tokens(x, 8) @ q.dequantize().reshape(k, -1)
    out = linear(x, q, contract=contract)
    assert out.shape == (2, 5, *shape[contract:]) and out.dtype == jnp.float32
    np.testing.assert_allclose(out.reshape(2, 5, -1), reference, rtol=1e-5, atol=1e-4)
    g = jax.random.normal(jax.random.key(2), out.shape)
    dx = jax.vjp(lambda x: linear(x, q, contract=contract), x)[1](g)[0]
    np.testing.assert_allclose(dx, g.reshape(2, 5, -1) @ q.dequantize().reshape(k, -1).T, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_match_within_bf16_tolerance():
    q = weight((64, 32), 8, 32)
    x = jax.random.normal(jax.random.key(3), (6, 64)).astype(jnp.bfloat16)
    ref = quantize_tokens(x.astype(jnp.float32), 8) @ q.dequantize()
    np.testing.assert_allclose(linear(x, q, jnp.bfloat16), ref, rtol=1e-2, atol=1e-2)


def _dots(f, *args):
    """(operand dtypes, result dtype) of every dot_general in `f`'s jaxpr, nested ones included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return found


def test_the_weight_stays_integer_up_to_the_dot():
    x = jax.random.normal(jax.random.key(4), (3, 64))
    w8a8 = weight((64, 32), 8, 32)
    assert _dots(lambda x: linear(x, w8a8), x) == [(("int8", "int8"), "int32")]
    weight_only = weight((64, 32), 8, 32, act_bits=None)  # no integer input: dequantized, a float dot
    assert not weight_only.integer_inputs
    assert _dots(lambda x: linear(x, weight_only), x) == [(("float32", "float32"), "float32")]
    asymmetric = weight((64, 32), 8, 32, weight_symmetric=False)  # zero points: floating point too
    assert not asymmetric.integer_inputs


def test_rows_of_zeros_and_mismatched_shapes():
    q = weight((16, 8), 8, 8)
    np.testing.assert_array_equal(integer_matmul(jnp.zeros((2, 16)), q.codes, q.scale), jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="do not agree"):
        integer_matmul(jnp.zeros((2, 15)), q.codes, q.scale)
