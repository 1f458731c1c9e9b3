import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.attention import alibi_slopes, causal_attention, causal_attention_reference


def naive_attention(q, k, v, segment_ids, positions, slopes):
    """Loop-by-loop softmax attention in float64 numpy: the independent definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, heads, d = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(heads):
            for i in range(length):
                if segment_ids[bi, i] == 0:
                    visible = list(range(length))  # padding rows: uniform over all keys
                    scores = np.zeros(length)
                else:
                    visible = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
                    scores = np.array([q[bi, i, h] @ k[bi, j, h // group] / np.sqrt(d) for j in visible])
                    if slopes is not None:
                        scores += np.array([slopes[h] * (positions[bi, j] - positions[bi, i]) for j in visible])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[bi, i, h] = sum(w * v[bi, j, h // group] for w, j in zip(weights, visible, strict=True))
    return out


@pytest.mark.parametrize("heads, kv_heads, use_alibi", [(4, 4, False), (4, 2, False), (6, 3, True), (3, 1, True)])
def test_reference_matches_naive_loops(heads, kv_heads, use_alibi):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, length, d = 2, 7, 8
    q = rng.normal(size=(b, length, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, length, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, length, kv_heads, d)).astype(np.float32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 0, 0], list(range(7))], np.int32)
    slopes = np.asarray(alibi_slopes(heads)) if use_alibi else None
    got = causal_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segment_ids),
                                     jnp.asarray(positions), None if slopes is None else jnp.asarray(slopes))
    want = naive_attention(q, k, v, segment_ids, positions, slopes)
    real = segment_ids != 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5)


def test_alibi_slopes_published_values():
    # Press et al.: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-7)
    # Not a power of two (BLOOM's rule): the 4-head slopes, then every other 8-head slope.
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-7)
    np.testing.assert_allclose(alibi_slopes(1), [2.0**-8], rtol=1e-7)
    assert alibi_slopes(12).shape == (12,) and len(set(np.asarray(alibi_slopes(12)).tolist())) == 12


def test_bf16_attention_close_to_f32():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 16, 4, 16)), jnp.float32) for _ in range(3))
    seg = jnp.ones((1, 16), jnp.int32)
    f32 = causal_attention_reference(q, k, v, seg)
    bf16 = causal_attention_reference(q, k, v, seg, compute_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, rtol=3e-2, atol=3e-2)
    jax.grad(lambda q: causal_attention_reference(q, k, v, seg, compute_dtype=jnp.bfloat16).sum())(q)


def test_flash_attention_kernel_matches_the_reference_forward_and_backward():
    """`causal_attention(implementation="pallas")`: the flash-attention kernel with every token kept in
    order, over packed documents with grouped heads and ALiBi, against the reference on the rows that
    see a key (a padding row gets 0 from the kernel and carries no cotangent in training)."""
    rng = np.random.default_rng(5)
    b, length, heads, kv_heads, d = 2, 40, 4, 2, 16  # 40 tokens: a partial last block of 16 in the interpreter
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, h, d)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    segment_ids = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 2]], 10, axis=1), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(10), 4)[None].repeat(2, 0), jnp.int32)
    alibi = alibi_slopes(heads)
    real = np.asarray(segment_ids != 0)[..., None, None]
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real

    def run(implementation):
        out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, segment_ids, positions, alibi,
                                                            implementation=implementation, interpret=True), q, k, v)
        return out, vjp(cotangent)

    (want, want_grads), (got, got_grads) = run("xla"), run("pallas")
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, rtol=1e-5, atol=2e-6)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-6, err_msg=f"d{name}")
    assert not np.asarray(got)[~real[..., 0, 0]].any()  # padding rows: zeros
