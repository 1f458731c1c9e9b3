"""`jaxllm.ops.evoformer_attention` (XLA, memory-efficient) against the naive reference, which is itself
checked against float64 loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.errors import UserError
from jaxllm.ops import evoformer_attention
from jaxllm.ops.evoformer import evoformer_attention_reference, pallas_supported
from tests.ops.evoformer_inputs import random_inputs, value_and_grads


def loops(q, k, v, biases):
    """softmax(q k / sqrt(d) + sum(biases)) v, one query at a time, in float64. All -inf: zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, n_, lq, h_, d = q.shape
    lk = k.shape[2]
    total = np.zeros((b_, n_, h_, lq, lk))
    for bias in biases:
        total = total + np.broadcast_to(np.asarray(bias, np.float64), total.shape)
    out = np.zeros_like(q)
    for b in range(b_):
        for n in range(n_):
            for h in range(h_):
                for i in range(lq):
                    s = np.array([q[b, n, i, h] @ k[b, n, j, h] / np.sqrt(d) for j in range(lk)]) + total[b, n, h, i]
                    if np.all(s == -np.inf):
                        continue
                    w = np.exp(s - s.max())
                    out[b, n, i, h] = (w / w.sum()) @ v[b, n, :, h]
    return out


def assert_close(got, want, rel, names):
    for g, w, name in zip(got, want, names, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.all(np.isfinite(g)), name
        scale = max(np.abs(w).max(), 1.0)  # gradients here are O(1); some are exactly 0 in theory
        err = np.abs(g - w).max()
        assert err <= rel * scale, f"{name}: max error {err:.3g} vs max |ref| {scale:.3g}"


def names(count):
    return ["out", "dq", "dk", "dv"] + [f"dbias{i}" for i in range(count)]


def test_reference_matches_float64_loops():
    b, n, L, h, d = 2, 3, 6, 2, 3
    q, k, v, biases, _ = random_inputs(0, (b, n, L, h, d), [(b, n, 1, 1, L), (b, 1, h, L, L)], mask_index=0)
    biases[0] = biases[0].at[1, 2].set(-jnp.inf)  # row (b=1, n=2): every key masked with -inf
    want = loops(q, k, v, biases)
    got = evoformer_attention_reference(q, k, v, biases)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[1, 2] == 0)


# (q shape, bias shapes, index of the 0/-1e9 mask bias or None, lk, block)
CASES = {
    # DeepSpeed's layout; 37 keys in blocks of 16: a shifted last block, D = 5.
    "deepspeed_mask_and_pair": ((2, 3, 37, 2, 5), [(2, 3, 1, 1, 37), (2, 1, 2, 37, 37)], 0, None, 16),
    # Full, key-only, per-query and query-broadcast biases; Lq != Lk; blocks divide neither length.
    "broadcasts_and_cross_lengths": ((2, 2, 11, 3, 4), [(1, 1, 1, 1, 19), (2, 2, 3, 11, 19), (1, 2, 1, 11, 1),
                                                       (2, 1, 3, 1, 19)], None, 19, 8),
    "no_bias_single_block": ((1, 2, 9, 2, 16), [], None, None, 128),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_xla_values_and_gradients_match_reference_f32(case):
    shape, bias_shapes, mask_index, lk, block = CASES[case]
    q, k, v, biases, cot = random_inputs(1, shape, bias_shapes, lk=lk, mask_index=mask_index)
    fast = lambda q, k, v, bs: evoformer_attention(q, k, v, bs, implementation="xla", block_q=block, block_k=block)
    got = value_and_grads(fast, q, k, v, biases, cot)
    want = value_and_grads(evoformer_attention_reference, q, k, v, biases, cot)
    assert_close(got, want, 1e-5, names(len(biases)))
    assert [g.shape for g in got[4:]] == [tuple(s) for s in bias_shapes]
    for g, s in zip(got[4:], bias_shapes, strict=True):
        if s[4] == 1:  # a bias constant over keys shifts each softmax row: its gradient is 0
            assert float(jnp.abs(g).max()) < 1e-5


def test_xla_bf16_within_deepspeed_tolerances():
    # DeepSpeed's test: max abs error < 5e-2 (bf16) for O, dQ, dK, dV and < 1e-1 for the pair bias
    # gradient; here additionally <= 1e-2 of the largest reference value, against an f32 reference.
    b, n, L, h, d = 1, 8, 64, 4, 32
    q, k, v, biases, cot = random_inputs(2, (b, n, L, h, d), [(b, n, 1, 1, L), (b, 1, h, L, L)],
                                         dtype=jnp.bfloat16, mask_index=0)
    fast = lambda q, k, v, bs: evoformer_attention(q, k, v, bs, implementation="xla", block_q=16, block_k=16)
    got = value_and_grads(fast, q, k, v, biases, cot)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = value_and_grads(evoformer_attention_reference, f32(q), f32(k), f32(v), [f32(x) for x in biases], f32(cot))
    for name, g, w, limit in zip(names(2), got, want, [5e-2] * 4 + [1e-1, 1e-1], strict=True):
        assert g.dtype == jnp.bfloat16
        err = float(jnp.abs(f32(g) - w).max())
        assert err < limit and err <= 1e-2 * float(jnp.abs(w).max()), (name, err)


def test_fully_masked_rows_output_zero_with_finite_gradients():
    b, n, L, h, d = 1, 3, 21, 2, 4
    q, k, v, biases, cot = random_inputs(3, (b, n, L, h, d), [(b, n, 1, 1, L), (b, 1, h, L, L)], mask_index=0)
    mask, pair = biases
    mask = mask.at[0, 1].set(-jnp.inf)  # sequence 1: no visible key for any query
    pair = pair.at[0, 0, 1, 4].set(-jnp.inf)  # head 1, query 4: no visible key in any sequence
    for impl in ("xla", "reference"):
        fn = evoformer_attention_reference if impl == "reference" else (
            lambda q, k, v, bs: evoformer_attention(q, k, v, bs, implementation="xla", block_q=8, block_k=8))
        out, dq, dk, dv, dmask, dpair = value_and_grads(fn, q, k, v, [mask, pair], cot)
        for g in (out, dq, dk, dv, dmask, dpair):
            assert np.all(np.isfinite(np.asarray(g))), impl
        assert np.all(np.asarray(out)[0, 1] == 0) and np.all(np.asarray(out)[0, :, 4, 1] == 0), impl
        assert np.all(np.asarray(dq)[0, 1] == 0) and np.all(np.asarray(dpair)[0, 0, 1, 4] == 0), impl
    fast = lambda q, k, v, bs: evoformer_attention(q, k, v, bs, implementation="xla", block_q=8, block_k=8)
    assert_close(value_and_grads(fast, q, k, v, [mask, pair], cot),
                 value_and_grads(evoformer_attention_reference, q, k, v, [mask, pair], cot), 1e-5, names(2))
    np.testing.assert_allclose(fast(q, k, v, [mask, pair]), loops(q, k, v, [mask, pair]), rtol=1e-5, atol=1e-5)


def test_deepspeed_finite_mask_on_every_key_averages_values():
    # With DeepSpeed's -1e9 mask on every key the scores are equal in f32: the softmax is uniform.
    b, n, L, h, d = 1, 2, 10, 2, 4
    q, k, v, _, _ = random_inputs(4, (b, n, L, h, d), [])
    mask = jnp.full((b, n, 1, 1, L), -1e9, jnp.float32)
    out = evoformer_attention(q, k, v, [mask], implementation="xla", block_q=4, block_k=4)
    np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(axis=2, keepdims=True), out.shape), rtol=1e-5, atol=1e-6)


def test_xla_temporary_memory_is_far_below_naive():
    # grad of the naive op holds several [B, N, H, L, L] f32 arrays; the blocked op only tiles of them.
    b, n, L, h, d = 1, 8, 512, 2, 8
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    operands = (sds(b, n, L, h, d), sds(b, n, L, h, d), sds(b, n, L, h, d), sds(b, n, 1, 1, L), sds(b, 1, h, L, L))

    def temp_bytes(fn):
        loss = lambda q, k, v, m, p: jnp.sum(fn(q, k, v, [m, p]))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4))).lower(*operands).compile().memory_analysis(
        ).temp_size_in_bytes

    scores = b * n * h * L * L * 4
    naive = temp_bytes(evoformer_attention_reference)
    blocked = temp_bytes(lambda q, k, v, bs: evoformer_attention(q, k, v, bs, implementation="xla"))
    assert naive >= 2 * scores
    assert blocked < scores / 2 and blocked * 10 < naive, (blocked, naive, scores)


def test_jit_and_auto_dispatch():
    assert not pallas_supported("cpu") and pallas_supported("tpu") and pallas_supported("gpu")
    q, k, v, biases, _ = random_inputs(5, (1, 2, 7, 2, 4), [(1, 2, 1, 1, 7)], mask_index=0)
    got = jax.jit(lambda q, k, v, bs: evoformer_attention(q, k, v, bs))(q, k, v, biases)
    np.testing.assert_allclose(got, loops(q, k, v, biases), rtol=1e-5, atol=1e-5)
    # None entries are skipped, as in DeepSpeed's list of optional biases.
    np.testing.assert_allclose(evoformer_attention(q, k, v, [None, biases[0]]), got, rtol=1e-6, atol=1e-6)


def test_bad_inputs_get_clear_errors():
    x = jnp.zeros((1, 2, 8, 2, 4))
    with pytest.raises(UserError, match=r"biases\[1\] of shape \(1, 2, 2, 8, 5\) does not broadcast"):
        evoformer_attention(x, x, x, [jnp.zeros((1, 2, 1, 1, 8)), jnp.zeros((1, 2, 2, 8, 5))])
    with pytest.raises(UserError, match=r"biases\[0\] must have rank 5"):
        evoformer_attention(x, x, x, [jnp.zeros((1, 2, 8, 8))])
    with pytest.raises(UserError, match=r"biases\[0\] has dtype bfloat16, q has float32"):
        evoformer_attention(x, x, x, [jnp.zeros((1, 1, 2, 8, 8), jnp.bfloat16)])
    with pytest.raises(UserError, match=r"q, k and v must share one dtype"):
        evoformer_attention(x, x.astype(jnp.bfloat16), x)
    with pytest.raises(UserError, match=r"q must have rank 5"):
        evoformer_attention(x[0], x, x)
    with pytest.raises(UserError, match=r"k and v must have the same shape"):
        evoformer_attention(x, x, x[:, :, :4])
    with pytest.raises(UserError, match=r"must agree in B, N, H and D"):
        evoformer_attention(x, jnp.zeros((1, 2, 8, 2, 3)), jnp.zeros((1, 2, 8, 2, 3)))
    with pytest.raises(UserError, match=r"q must be floating point"):
        evoformer_attention(x.astype(jnp.int32), x.astype(jnp.int32), x.astype(jnp.int32))
    with pytest.raises(UserError, match=r"unknown implementation 'cuda'"):
        evoformer_attention(x, x, x, implementation="cuda")
