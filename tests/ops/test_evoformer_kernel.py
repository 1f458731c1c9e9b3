"""Pallas Evoformer attention kernels (interpret mode on CPU) against the naive `jnp` reference.

Shapes are tiny: the interpreter runs each grid point as a loop iteration. Lengths and D are chosen so
that padding (of L to the 16-blocks and of D to 16) and several blocks are exercised.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.errors import UserError
from jaxllm.ops import evoformer_attention
from jaxllm.ops.evoformer import evoformer_attention_reference
from pallas_kernels.evoformer_attention import evoformer_attention as pallas_attention
from tests.conftest import PALLAS_INTERPRET
from tests.ops.evoformer_inputs import random_inputs, value_and_grads


def kernel(q, k, v, biases):
    return pallas_attention(q, k, v, biases, block_q=16, block_k=16, interpret=PALLAS_INTERPRET)


def test_f32_values_and_gradients_match_reference():
    # DeepSpeed's bias layout; L = 20 pads to two 16-blocks, D = 5 pads to 16.
    b, n, L, h, d = 1, 2, 20, 2, 5
    q, k, v, biases, cot = random_inputs(0, (b, n, L, h, d), [(b, n, 1, 1, L), (b, 1, h, L, L)], jnp.float32,
                                         mask_index=0)
    got = value_and_grads(kernel, q, k, v, biases, cot)
    want = value_and_grads(evoformer_attention_reference, q, k, v, biases, cot)
    for name, g, w in zip(["out", "dq", "dk", "dv", "dmask", "dpair"], got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        err, scale = float(jnp.abs(g - w).max()), max(float(jnp.abs(w).max()), 1.0)
        assert err <= 1e-5 * scale, (name, err, scale)


def test_bf16_within_deepspeed_tolerances():
    # DeepSpeed: max abs error < 5e-2 for O, dQ, dK, dV and < 1e-1 for bias gradients (bf16); here
    # also <= 1e-2 of the largest value of an f32 reference on the same inputs.
    b, n, L, h, d = 1, 2, 32, 2, 16
    q, k, v, biases, cot = random_inputs(1, (b, n, L, h, d), [(b, n, 1, 1, L), (b, 1, h, L, L)], jnp.bfloat16,
                                         mask_index=0)
    got = value_and_grads(kernel, q, k, v, biases, cot)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = value_and_grads(evoformer_attention_reference, f32(q), f32(k), f32(v), [f32(x) for x in biases], f32(cot))
    for name, g, w, limit in zip(["out", "dq", "dk", "dv", "dmask", "dpair"], got, want, [5e-2] * 4 + [1e-1] * 2,
                                 strict=True):
        assert g.dtype == jnp.bfloat16, name
        err = float(jnp.abs(f32(g) - w).max())
        assert err < limit and err <= 1e-2 * float(jnp.abs(w).max()), (name, err)


def test_broadcasts_cross_lengths_and_fully_masked_rows_via_public_op():
    # Lq = 9, Lk = 18; a full bias and a per-query bias; one sequence and one (head, query) fully
    # masked with -inf, which must output 0 with finite gradients, like the reference.
    b, n, lq, lk, h, d = 2, 2, 9, 18, 2, 4
    q, k, v, biases, cot = random_inputs(2, (b, n, lq, h, d), [(b, n, 1, 1, lk), (b, n, h, lq, lk), (1, 1, h, lq, 1)],
                                         jnp.float32, lk=lk, mask_index=0)
    biases[0] = biases[0].at[1, 0].set(-jnp.inf)
    biases[1] = biases[1].at[0, 1, 1, 3].set(-jnp.inf)
    public = lambda q, k, v, bs: evoformer_attention(q, k, v, bs, implementation="pallas")  # noqa: E731
    got = value_and_grads(public, q, k, v, biases, cot)
    want = value_and_grads(evoformer_attention_reference, q, k, v, biases, cot)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and np.all(np.isfinite(np.asarray(g))), i
        assert float(jnp.abs(g - w).max()) <= 1e-5 * max(float(jnp.abs(w).max()), 1.0), i
    out = np.asarray(got[0])
    assert np.all(out[1, 0] == 0) and np.all(out[0, 1, 3, 1] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_gpu(dtype):
    # Cross-platform lowering runs the Pallas Triton lowering on this CPU-only machine: forward, dQ,
    # dK/dV and one bias-gradient kernel per bias become Triton custom calls.
    sds = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    b, n, L, h, d = 1, 3, 200, 4, 32
    operands = (sds(b, n, L, h, d), sds(b, n, L, h, d), sds(b, n, L, h, d), sds(b, n, 1, 1, L), sds(b, 1, h, L, L))
    loss = lambda q, k, v, m, p: jnp.sum(pallas_attention(q, k, v, [m, p]).astype(jnp.float32))  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    text = grad.trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 5


def test_block_sizes_must_suit_triton():
    x = jnp.zeros((1, 1, 8, 1, 4))
    with pytest.raises(UserError, match="block_q must be a power of two >= 16, got 24"):
        pallas_attention(x, x, x, block_q=24, interpret=True)
    with pytest.raises(UserError, match=r"biases\[0\] must have rank 5"):
        pallas_attention(x, x, x, [jnp.zeros((8, 8))], interpret=True)


@pytest.mark.slow  # the TPU interpreter simulates every grid step's copies
def test_tpu_variant_matches_reference_in_tpu_interpret_mode():
    # The Mosaic TPU variant (128-blocks, key padding 136 -> 256, and the bias gradients as grid
    # reductions over the broadcast axes: N for the pair bias, H and the query blocks for the mask),
    # run by the TPU interpreter on this CPU.
    from jax.experimental.pallas import tpu as pltpu

    b, n, L, h, d = 1, 2, 136, 2, 8
    q, k, v, biases, cot = random_inputs(6, (b, n, L, h, d), [(b, n, 1, 1, L), (b, 1, h, L, L)], jnp.float32,
                                         mask_index=0)
    with pltpu.force_tpu_interpret_mode():
        got = value_and_grads(lambda q, k, v, bs: pallas_attention(q, k, v, bs, backend="mosaic_tpu"), q, k, v,
                              biases, cot)
    want = value_and_grads(evoformer_attention_reference, q, k, v, biases, cot)
    for name, g, w in zip(["out", "dq", "dk", "dv", "dmask", "dpair"], got, want, strict=True):
        assert g.shape == w.shape, name
        assert float(jnp.abs(g - w).max()) <= 1e-5 * max(float(jnp.abs(w).max()), 1.0), name
