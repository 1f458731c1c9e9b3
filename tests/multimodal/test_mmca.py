"""MMCA against a plain numpy reference written from the definition, and its decoder hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.multimodal import mmca_attention, mmca_override
from jaxllm.ops.attention import alibi_slopes, causal_attention


def reference(q, k, v, types, alibi=None):
    """Query by query, from the definition: a text query i sums a softmax over image keys j <= i and a
    softmax over text keys j <= i (an empty set contributes 0); an image query returns its own value; a
    padding query returns 0. float64, explicit loops."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, length, heads, dim))
    for b in range(batch):
        for h in range(heads):
            kh = h // group
            for i in range(length):
                if types[b, i] == 0:
                    continue
                if types[b, i] == 2:
                    out[b, i, h] = v[b, i, kh]
                    continue
                for kind in (1, 2):
                    keys = [j for j in range(i + 1) if types[b, j] == kind]
                    if not keys:
                        continue
                    s = np.array([q[b, i, h] @ k[b, j, kh] / np.sqrt(dim) for j in keys])
                    if alibi is not None:
                        s = s + alibi[h] * (np.array(keys) - i)
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    out[b, i, h] += sum(wj * v[b, j, kh] for wj, j in zip(w, keys, strict=True))
    return out


TYPES = np.array([
    [1, 1, 2, 2, 2, 1, 1, 2, 2, 1, 1, 0, 0],  # text before the first image (empty image branch), two images, pads
    [2, 2, 1, 1, 2, 2, 2, 1, 2, 2, 1, 1, 1],  # starts with an image; three images
    [0, 0, 0, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1],  # left padding
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # text only: MMCA is causal attention
])


@pytest.mark.parametrize("kv_heads,use_alibi", [(4, False), (2, True)])
def test_mmca_matches_the_definition(kv_heads, use_alibi):
    keys = jax.random.split(jax.random.key(0), 3)
    batch, length = TYPES.shape
    q = jax.random.normal(keys[0], (batch, length, 4, 8))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, 8))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, 8))
    alibi = alibi_slopes(4) if use_alibi else None
    got = mmca_attention(q, k, v, jnp.asarray(TYPES), alibi=alibi)
    want = reference(q, k, v, TYPES, None if alibi is None else np.asarray(alibi))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
    # The four cases, spelled out on row 0.
    assert np.all(np.asarray(got)[0, 11:] == 0)  # padding queries: zeros
    np.testing.assert_allclose(np.asarray(got)[0, 3], np.repeat(np.asarray(v)[0, 3], 4 // kv_heads, 0),
                               atol=1e-6)  # an image query reads itself only
    # A text query after an image sums two distributions: its output differs from a single softmax.
    single = causal_attention(q, k, v, jnp.ones_like(TYPES), None, alibi)
    assert not np.allclose(np.asarray(got)[0, 5], np.asarray(single)[0, 5], atol=1e-3)
    np.testing.assert_allclose(np.asarray(got)[3], np.asarray(single)[3], atol=2e-6)  # text only


def test_mmca_gradients_are_finite_and_match_the_reference_numerically():
    batch, length = TYPES.shape
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (batch, length, 2, 4)) for key in keys)
    types = jnp.asarray(TYPES)
    loss = lambda q, k, v: jnp.sum(jnp.sin(mmca_attention(q, k, v, types)))  # noqa: E731
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    # Directional derivative against a central difference of the float64 reference.
    direction = [jax.random.normal(jax.random.key(7 + i), x.shape) for i, x in enumerate((q, k, v))]
    eps = 1e-4
    plus = [np.asarray(x, np.float64) + eps * np.asarray(d) for x, d in zip((q, k, v), direction, strict=True)]
    minus = [np.asarray(x, np.float64) - eps * np.asarray(d) for x, d in zip((q, k, v), direction, strict=True)]
    numeric = (np.sin(reference(*plus, TYPES)).sum() - np.sin(reference(*minus, TYPES)).sum()) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(grads, direction, strict=True))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom"])
def test_decoder_hooks_keep_default_numerics(family):
    extra = {"llama": dict(kv_heads=2)}.get(family, {})
    cfg = ModelConfig(family=family, layers=2, d_model=32, heads=4, vocab_size=61, max_len=32, **extra)
    model = Decoder(cfg, rngs=nnx.Rngs(params=3))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 61)
    plain = model(tokens)
    # Embeddings in place of ids, and MMCA over text-only rows, reproduce the plain forward.
    embedded = model(None, embeddings=jnp.take(model.embed[...], tokens, axis=0))
    mmca_text = model(tokens, attention=mmca_override(jnp.ones((2, 12), jnp.int32)))
    np.testing.assert_array_equal(np.asarray(embedded), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(mmca_text), np.asarray(plain), atol=2e-5, rtol=1e-5)
    # With an image run in the row, the override changes the logits after it (and only there).
    types = jnp.asarray([[1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]] * 2)
    mixed = np.asarray(model(tokens, attention=mmca_override(types)))
    np.testing.assert_allclose(mixed[:, :2], np.asarray(plain)[:, :2], atol=2e-5, rtol=1e-5)
    assert not np.allclose(mixed[:, 5:], np.asarray(plain)[:, 5:], atol=1e-4)


def test_bad_shapes_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="token_types"):
        mmca_attention(q, q, q, jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="multiple"):
        mmca_attention(jnp.zeros((1, 4, 3, 8)), q, q, jnp.ones((1, 4), jnp.int32))
