"""Token-dropped attention: the reference against full attention restricted to the kept tokens, and the
Pallas kernel (interpret mode) against the reference, forward and backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.errors import UserError
from jaxllm.ltd import gather_tokens, sample_kept_indices
from jaxllm.ops.attention import alibi_slopes, causal_attention_reference
from jaxllm.ops.dispatch import pallas_selected
from jaxllm.ops.token_dropped_attention import token_dropped_attention, token_dropped_attention_reference
from pallas_kernels.token_dropped_attention import token_dropped_attention as kernel
from tests.conftest import PALLAS_INTERPRET


def inputs(batch, length, kept, heads, kv_heads, dim, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (batch, kept, heads, dim), dtype)
    k = jax.random.normal(ks[1], (batch, kept, kv_heads, dim), dtype)
    v = jax.random.normal(ks[2], (batch, kept, kv_heads, dim), dtype)
    idx = sample_kept_indices(ks[3], 1, batch, length, kept)[0]
    segments = np.ones((batch, length), np.int32)
    segments[-1, length // 2:] = 2  # the last row packs two documents
    segments[0, length - 3:] = 0  # the first row ends in padding
    positions = np.arange(length)[None].repeat(batch, 0)
    positions[-1, length // 2:] -= length // 2
    seg, pos = gather_tokens(jnp.asarray(segments), idx), gather_tokens(jnp.asarray(positions), idx)
    return q, k, v, seg, pos, idx, jnp.asarray(segments), jnp.asarray(positions)


def test_reference_equals_full_attention_restricted_to_kept_tokens():
    batch, length, kept, heads, kv, dim = 2, 16, 7, 4, 2, 8
    q, k, v, seg, pos, idx, segments, positions = inputs(batch, length, kept, heads, kv, dim)
    alibi = alibi_slopes(heads)
    got = token_dropped_attention_reference(q, k, v, seg, pos, idx, alibi)
    # Scatter q, k, v into full-length rows; dropped tokens get their own segment so no kept query sees them.
    rows = jnp.arange(batch)[:, None]
    full = lambda x: jnp.zeros((batch, length, *x.shape[2:]), x.dtype).at[rows, idx].set(x)
    kept_mask = jnp.zeros((batch, length), bool).at[rows, idx].set(True)
    hidden = jnp.where(kept_mask, segments, 100 + jnp.arange(length)[None])
    want = causal_attention_reference(full(q), full(k), full(v), hidden, positions, alibi)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(gather_tokens(want, idx))[real], rtol=1e-5,
                               atol=1e-6)


CASES = [  # batch, length, kept, heads, kv_heads, dim, block, alibi
    (2, 40, 24, 4, 2, 8, 16, True),  # grouped heads, ALiBi, kept length not a multiple of the block
    (1, 20, 16, 2, 2, 12, 16, False),  # head size padded to 16, one block
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_forward_and_backward(case):
    batch, length, kept, heads, kv, dim, block, use_alibi = case
    q, k, v, seg, pos, idx, _, _ = inputs(batch, length, kept, heads, kv, dim, seed=len(CASES))
    alibi = alibi_slopes(heads) if use_alibi else None
    real = (np.asarray(seg) != 0)[..., None, None]
    cot = jax.random.normal(jax.random.key(9), q.shape) * real  # padding rows carry no cotangent in training

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, pos, idx, alibi), q, k, v)
        return out, vjp(cot)

    want, want_grads = run(token_dropped_attention_reference)
    got, got_grads = run(lambda *a: kernel(*a, block=block, interpret=PALLAS_INTERPRET))
    np.testing.assert_allclose(np.asarray(got) * real, np.asarray(want) * real, rtol=1e-5, atol=2e-6)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-6, err_msg=f"d{name}")


def test_kernel_in_bfloat16_and_dispatch():
    q, k, v, seg, pos, idx, _, _ = inputs(1, 24, 16, 2, 1, 16, seed=3, dtype=jnp.bfloat16)
    real = (np.asarray(seg) != 0)[..., None, None]
    want = token_dropped_attention_reference(q, k, v, seg, pos, idx, None, jnp.bfloat16)
    got = token_dropped_attention(q, k, v, seg, pos, idx, None, jnp.bfloat16, implementation="pallas")
    np.testing.assert_allclose(np.asarray(got, np.float32) * real, np.asarray(want, np.float32) * real,
                               rtol=2e-2, atol=2e-2)
    selected = functools.partial(pallas_selected, "token-dropped attention")
    assert not selected("auto", "cpu") and selected("auto", "gpu") and selected("auto", "tpu")
    assert not selected("xla", "gpu") and selected("pallas", "cpu")
    with pytest.raises(UserError, match="token-dropped attention: unknown implementation 'cuda'"):
        selected("cuda")
    with pytest.raises(UserError, match="block must be a power of two"):
        kernel(q, k, v, seg, pos, idx, block=24, interpret=True)
