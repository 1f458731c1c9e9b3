"""gradient_barrier: the identity in value and gradient, and on CPU a real boundary in the compiled backward."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops.barrier import gradient_barrier


def _loss(x, w, barrier):
    h = jnp.tanh(x @ w)
    h = gradient_barrier(h) if barrier else h
    return jnp.sum(jnp.sin(h @ w.T) ** 2)


def test_values_and_gradients_equal_the_plain_function():
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, (6, 5)), jax.random.normal(kw, (5, 4))
    assert np.array_equal(gradient_barrier(x), x)
    got = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=2)(x, w, True)
    want = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=2)(x, w, False)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


def test_bf16_and_nan_gradients_pass_through_unchanged():
    g = jax.grad(lambda x: jnp.sum(gradient_barrier(x) * jnp.array([jnp.nan, 1.0], jnp.bfloat16)))(
        jnp.ones(2, jnp.bfloat16))  # a NaN first element makes the loop run twice: still the identity
    assert g.dtype == jnp.bfloat16
    assert jnp.isnan(g[0]) and g[1] == 1


def test_cpu_backward_keeps_a_loop_that_xla_cannot_fuse_through():
    x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
    hlo = jax.jit(jax.grad(_loss), static_argnums=2).lower(x, w, True).compile().as_text()
    assert " while(" in hlo
    plain = jax.jit(jax.grad(_loss), static_argnums=2).lower(x, w, False).compile().as_text()
    assert " while(" not in plain


def test_a_program_lowered_for_a_tpu_or_gpu_gets_the_identity():
    """Traced on this CPU host, lowered for an accelerator (as `python -m jaxllm.aot` does): no loop."""
    x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
    traced = jax.jit(jax.grad(_loss), static_argnums=2).trace(x, w, True)
    assert "stablehlo.while" in traced.lower(lowering_platforms=("cpu",)).as_text()
    for platform in ("tpu", "cuda"):
        assert "stablehlo.while" not in traced.lower(lowering_platforms=(platform,)).as_text()
