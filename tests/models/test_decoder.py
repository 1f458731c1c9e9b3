import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.mesh import LOGICAL_RULES
from jaxllm.models.decoder import Decoder, count_params, rotary
from jaxllm.ops.attention import alibi_slopes

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama", kv_heads=2),
    "bloom": dict(family="bloom", heads=6, d_model=48),  # 6 heads: ALiBi slopes off the power-of-two path
}


def make(family, **extra):
    cfg = ModelConfig(**(dict(layers=2, d_model=32, heads=4, vocab_size=97, max_len=32) | FAMILIES[family] | extra))
    return cfg, Decoder(cfg, rngs=nnx.Rngs(params=0))


def numpy_forward(cfg: ModelConfig, params, tokens):
    """A float64 numpy decoder written from the architecture descriptions, sharing no code with the model."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    length = tokens.shape[-1]
    pos = np.arange(length)

    def norm(x, n):
        if cfg.family == "llama":
            return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps) * n["scale"]
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * n["scale"] + n["bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def rope(x):  # x [l, h, d]; pairs (i, i + d/2)
        half = x.shape[-1] // 2
        inv = cfg.rope_theta ** (-np.arange(half) / half)
        ang = pos[:, None, None] * inv
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)

    x = p["embed"][tokens]
    if cfg.family == "gpt2":
        x = x + p["pos_embed"][pos]
    if cfg.family == "bloom":
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        x = (x - mu) / np.sqrt(var + cfg.norm_eps) * p["embed_norm"]["scale"] + p["embed_norm"]["bias"]
    slopes = np.asarray(alibi_slopes(cfg.heads), np.float64)
    group = cfg.heads // cfg.num_kv_heads
    for i in range(cfg.layers):
        blk = p["blocks"][i]
        a = blk["attn"]
        h = norm(x, blk["attn_norm"])
        q = np.einsum("ld,dhk->lhk", h, a["wq"]) + a.get("bq", 0)
        k = np.einsum("ld,dhk->lhk", h, a["wk"]) + a.get("bk", 0)
        v = np.einsum("ld,dhk->lhk", h, a["wv"]) + a.get("bv", 0)
        if cfg.family == "llama":
            q, k = rope(q), rope(k)
        out = np.zeros_like(q)
        for head in range(cfg.heads):
            s = q[:, head] @ k[:, head // group].T / np.sqrt(cfg.head_dim)
            if cfg.family == "bloom":
                s = s + slopes[head] * (pos[None, :] - pos[:, None])
            s = np.where(np.tril(np.ones((length, length))) > 0, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // group]
        x = x + np.einsum("lhk,hkd->ld", out, a["wo"]) + a.get("bo", 0)
        m = blk["mlp"]
        h = norm(x, blk["mlp_norm"])
        if cfg.family == "llama":
            hidden = (h @ m["w_gate"]) / (1 + np.exp(-(h @ m["w_gate"]))) * (h @ m["w_in"])
        else:
            hidden = gelu_tanh(h @ m["w_in"] + m["b_in"])
        x = x + hidden @ m["w_out"] + m.get("b_out", 0)
    x = norm(x, p["final_norm"])
    return x @ (p["embed"].T if cfg.tied else p["head"])


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _perturb(params, seed=1):
    """Random values everywhere (biases and norms included) so that every parameter matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_matches_independent_numpy(family):
    cfg, model = make(family)
    params = _perturb(_params(model))
    nnx.update(model, _as_state(model, params))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    got = np.asarray(model(jnp.asarray(tokens)))
    want = np.stack([numpy_forward(cfg, params, t) for t in tokens])
    assert got.shape == (2, 11, cfg.vocab_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _as_state(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return state


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_documents_do_not_see_each_other(family):
    cfg, model = make(family)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    positions = jnp.asarray([list(range(5)) + list(range(7))])
    together = model(packed, positions, segments)
    np.testing.assert_allclose(together[0, :5], model(jnp.asarray(a[None]))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(together[0, 5:], model(jnp.asarray(b[None]))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal(family):
    cfg, model = make(family)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 10)))
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % cfg.vocab_size)
    np.testing.assert_array_equal(model(tokens)[0, :6], model(changed)[0, :6])
    assert not np.allclose(model(tokens)[0, 6:], model(changed)[0, 6:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remat_scanned_layers_and_bf16(family):
    cfg, model = make(family)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9)))
    params = _params(model)

    def loss(cfg_, p):
        m = Decoder(cfg_, rngs=nnx.Rngs(0))
        nnx.update(m, _as_state(m, p))
        return jnp.mean(jax.nn.log_softmax(m(tokens)) ** 2)

    base_loss, base = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    for change in ({"remat": "full"}, {"remat": "dots"}, {"scan_layers": True},
                   {"scan_layers": True, "remat": "dots"}):
        other_cfg = ModelConfig(**(cfg.__dict__ | change))
        other_loss, other = jax.value_and_grad(lambda p, c=other_cfg: loss(c, p))(params)
        np.testing.assert_allclose(other_loss, base_loss, rtol=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), base, other)
    bf16_cfg = ModelConfig(**(cfg.__dict__ | {"compute_dtype": "bfloat16"}))
    bf16_loss, bf16 = jax.value_and_grad(lambda p: loss(bf16_cfg, p))(params)
    np.testing.assert_allclose(bf16_loss, base_loss, rtol=1e-2)
    flat_b, flat_f = jax.tree.leaves(bf16), jax.tree.leaves(base)
    for x, y in zip(flat_b, flat_f, strict=True):
        assert np.linalg.norm(x - y) <= 5e-2 * np.linalg.norm(y) + 1e-6


def test_rotary_depends_only_on_relative_position():
    rng = np.random.default_rng(4)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        return float(jnp.sum(rotary(q, jnp.asarray([[pq]]), 1e4) * rotary(k, jnp.asarray([[pk]]), 1e4)))

    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(rotary(q, jnp.asarray([[5]]), 1e4)), jnp.linalg.norm(q), rtol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_parameter_has_known_logical_axes_and_counts_add_up(family):
    cfg, model = make(family)
    total = 0
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.logical_axes
        assert len(axes) == variable[...].ndim
        assert all(a in LOGICAL_RULES for a in axes)
        total += variable[...].size
    assert count_params(cfg)["total"] == total
    tied = cfg.family != "llama"
    assert ("head" in _params(model)) is (not tied)
