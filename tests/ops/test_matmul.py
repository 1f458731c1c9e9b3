import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops.matmul import matmul


def test_f32_is_plain_dot():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 5, 8)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32)
    np.testing.assert_allclose(matmul(jnp.asarray(x), jnp.asarray(w)), x @ w, rtol=1e-5, atol=1e-5)


def test_bf16_forward_and_gradients_match_reference_on_rounded_inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(4, 3, 8)), jnp.float32)
    rounded = lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    xr, wr, gr = rounded(x), rounded(w), rounded(g)

    out, vjp = jax.vjp(lambda a, b: matmul(a, b, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    assert out.dtype == jnp.float32 and dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    # Inputs rounded to bf16, products accumulated in (at least) f32.
    np.testing.assert_allclose(out, xr @ wr, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, gr @ wr.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, np.einsum("abi,abo->io", xr, gr), rtol=1e-5, atol=1e-4)


def test_bf16_backward_dots_take_bf16_inputs_with_f32_results():
    x, w = jnp.ones((2, 8)), jnp.ones((8, 4))
    hlo = jax.jit(jax.grad(lambda a, b: matmul(a, b, jnp.bfloat16).sum(), argnums=(0, 1))).lower(x, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 2  # dx and dw (the forward dot is dead code under grad of a sum)
    for line in dots:
        assert "bf16" in line.split("dot_general")[1].split(")")[0] and "-> tensor<" in line and "xf32>" in line


def test_transposed_weight_matches_and_runs_at_lm_head_sizes():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(4096, 64)), jnp.float32)  # [vocab, d], as a tied embedding
    for dtype in (jnp.float32, jnp.bfloat16):
        out, vjp = jax.vjp(lambda a, b, d=dtype: matmul(a, b, d, transpose_w=True), x, table)
        ref, ref_vjp = jax.vjp(lambda a, b, d=dtype: matmul(a, b.T, d), x, table)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
        g = jnp.ones_like(out)
        for got, want in zip(vjp(g), ref_vjp(g), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
