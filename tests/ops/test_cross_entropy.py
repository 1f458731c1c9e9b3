"""Token cross-entropy: the gather and the one-hot pick both equal `-log_softmax` at the target, value and
gradient, in f32 for bf16 logits too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.cross_entropy import one_hot_targets, token_cross_entropy


def reference(logits, targets):
    log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return -np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_both_picks_equal_the_log_softmax_reference(one_hot, dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 37)) * 4, dtype)
    targets = jnp.asarray(rng.integers(0, 37, (2, 5)), jnp.int32)

    def total(x):
        if one_hot:
            with one_hot_targets():
                return jnp.sum(token_cross_entropy(x, targets))
        return jnp.sum(token_cross_entropy(x, targets))

    with one_hot_targets() if one_hot else jax.named_scope("gather"):
        got = token_cross_entropy(logits, targets)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, reference(logits.astype(jnp.float32), targets), rtol=1e-5, atol=1e-5)
    grad = jax.grad(total)(logits.astype(jnp.float32))
    want = jax.nn.softmax(np.asarray(logits, np.float64), axis=-1) - jax.nn.one_hot(targets, 37)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)
