"""random-LTD: DeepSpeed's kept-length schedule, sampling, gather/scatter gradients, the decoder's dropped
layers against full attention with the dropped keys masked, and the LayerToken learning rate."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config as config_lib
from jaxllm import ltd
from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.models.decoder import Decoder
from jaxllm.ops.attention import alibi_slopes
from jaxllm.optim.schedules import warmup_cosine

GPT2_FT = {"min_value": 128, "max_value": 1024, "schedule_type": "fixed_linear",  # DeepSpeedExamples GPT-2
           "schedule_config": {"require_steps": 400, "seq_per_step": 8}}
GPT3 = {"min_value": 128, "max_value": 2048, "schedule_type": "fixed_linear",  # GPT-3 1.3B pretraining recipe
        "schedule_config": {"require_steps": 200_000, "seq_per_step": 16}}


def test_kept_length_is_deepspeeds_schedule():
    steps = np.arange(0, 600)
    value = np.floor(steps / 400 * (1024 - 128) + 128).astype(int)
    expected = np.minimum(value - value % 8, 1024)
    assert [ltd.kept_length(GPT2_FT, int(t)) for t in steps] == expected.tolist()
    # By hand: t=1: 130.24 -> 130 -> 128; t=200: 576; t=399: 1021.76 -> 1021 -> 1016; t=400: 1024.
    assert [ltd.kept_length(GPT2_FT, t) for t in (0, 1, 200, 399, 400)] == [128, 128, 576, 1016, 1024]
    # t=100000: 0.5 * 1920 + 128 = 1088; t=1667: 144.0 -> 144; t=1666: 143.99 -> 143 -> 128.
    assert [ltd.kept_length(GPT3, t) for t in (100_000, 1667, 1666, 10**6)] == [1088, 144, 128, 2048]
    assert ltd.kept_length(lambda step: 7 * step, 3) == 21


def test_bad_random_ltd_settings_get_clear_errors():
    with pytest.raises(UserError, match="min_value 512 exceeds max_value 128"):
        ltd.check_ltd_schedule({**GPT2_FT, "min_value": 512, "max_value": 128})
    with pytest.raises(UserError, match="kept length 1024 exceeds the sequence length data.seq_len=512"):
        ltd.check_ltd_schedule(GPT2_FT, seq_len=512)
    with pytest.raises(UserError, match="fixed_linear"):
        ltd.check_ltd_schedule({**GPT2_FT, "schedule_type": "fixed_root"})
    with pytest.raises(UserError, match="layer id 6 is out of range"):
        ltd.check_layers([1, 6], 6)
    with pytest.raises(UserError, match="kept length 9"):
        ltd.sample_kept_indices(jax.random.key(0), 1, 1, 8, 9)
    base = ["random_ltd.enabled=true", "model.layers=4", "data.seq_len=64",
            "random_ltd.random_ltd_schedule.schedule_config.require_steps=10",
            "random_ltd.random_ltd_schedule.schedule_config.seq_per_step=8",
            "random_ltd.random_ltd_schedule.min_value=16"]
    good = config_lib.load(None, [*base, "random_ltd.random_ltd_schedule.max_value=64"])
    assert good.random_ltd.layer_ids(4) == (1, 2)
    for extra, message in [(["random_ltd.random_ltd_schedule.max_value=128"], "exceeds the sequence length"),
                           (["random_ltd.random_ltd_schedule.max_value=64", "random_ltd.random_ltd_layer_id=[0,4]"],
                            "random_ltd_layer_id: layer id 4 is out of range"),
                           (["random_ltd.random_ltd_schedule.max_value=64", "random_ltd.random_ltd_layer_num=3"],
                            "random_ltd_layer_num"),
                           (["random_ltd.random_ltd_schedule.max_value=8"], "min_value 16 exceeds max_value 8")]:
        with pytest.raises(UserError, match=message):
            config_lib.load(None, [*base, *extra])


def test_sampling_is_sorted_uniform_and_a_function_of_seed_and_step():
    idx = np.asarray(ltd.sample_kept_indices(ltd.ltd_key(3, 5), 2, 4000, 8, 3))
    assert idx.shape == (2, 4000, 3)
    assert np.all(np.diff(idx, axis=-1) > 0) and idx.min() >= 0 and idx.max() < 8  # sorted, distinct
    freq = np.bincount(idx.ravel(), minlength=8) / idx[..., 0].size
    assert np.allclose(freq, 3 / 8, atol=0.03)  # each position kept with probability r / S
    subsets = {tuple(r) for r in idx.reshape(-1, 3)}
    assert subsets == set(itertools.combinations(range(8), 3))  # every subset occurs
    again = ltd.sample_kept_indices(ltd.ltd_key(3, 5), 2, 4000, 8, 3)
    assert np.array_equal(idx, again)
    assert not np.array_equal(idx, ltd.sample_kept_indices(ltd.ltd_key(3, 6), 2, 4000, 8, 3))
    assert not np.array_equal(idx, ltd.sample_kept_indices(ltd.ltd_key(4, 5), 2, 4000, 8, 3))


def test_gather_scatter_gradients_are_identity_on_dropped_tokens():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3))
    w = jax.random.normal(jax.random.key(1), (2, 6, 3))
    idx = jnp.asarray([[0, 2, 5], [1, 3, 4]])
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    layer = lambda xs, ps, ss, i: jnp.tanh(2.0 * xs) + 0.0 * ps[..., None]
    out = ltd.dropped_layer(layer, x, pos, jnp.ones((2, 6), jnp.int32), idx)
    grad = jax.grad(lambda x: jnp.sum(w * ltd.dropped_layer(layer, x, pos, jnp.ones((2, 6), jnp.int32), idx)))(x)
    kept = np.zeros((2, 6), bool)
    kept[np.arange(2)[:, None], np.asarray(idx)] = True
    k = kept[..., None]
    np.testing.assert_allclose(out, np.where(k, np.tanh(2 * x), x), rtol=1e-6)
    expected = np.where(k, w * 2 * (1 - np.tanh(2 * x) ** 2), w)  # layer derivative on kept, identity on dropped
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


FAMILIES = {"gpt2": dict(family="gpt2"), "llama": dict(family="llama", kv_heads=2),
            "bloom": dict(family="bloom", heads=6, d_model=48)}


def make(family):
    cfg = ModelConfig(**(dict(layers=3, d_model=32, heads=4, vocab_size=61, max_len=32) | FAMILIES[family]))
    return cfg, Decoder(cfg, rngs=nnx.Rngs(params=0))


def packed_row_inputs(batch=2, length=12):
    segments = np.ones((batch, length), np.int32)
    segments[1, 7:] = 2  # row 1 packs two documents
    segments[0, 10:] = 0  # row 0 ends in padding
    positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    positions[1, 7:] -= 7
    positions[0, 10:] = 0
    return jnp.asarray(positions), jnp.asarray(segments)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kept_token_layer_equals_full_layer_with_dropped_keys_masked(family):
    cfg, model = make(family)
    positions, segments = packed_row_inputs()
    x = jax.random.normal(jax.random.key(2), (2, 12, cfg.d_model))
    idx = ltd.sample_kept_indices(jax.random.key(7), 1, 2, 12, 5)[0]
    alibi = alibi_slopes(cfg.heads) if family == "bloom" else None
    block = model.blocks[1]
    y = ltd.dropped_layer(model._kept_tokens_block(block, alibi, "xla"), x, positions, segments, idx)
    kept = np.zeros((2, 12), bool)
    kept[np.arange(2)[:, None], np.asarray(idx)] = True
    # Full layer over all tokens, with each dropped token moved to a segment of its own: kept queries then
    # see exactly the kept keys at their original positions (causal mask, RoPE, ALiBi all from them).
    hidden = jnp.where(jnp.asarray(kept), segments, 100 + jnp.arange(12)[None, :])
    full = block(x, positions, hidden, alibi)
    real = kept & (np.asarray(segments) != 0)
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(full)[real], rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(y)[~kept], np.asarray(x)[~kept])  # dropped tokens pass through


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_keeping_every_token_is_the_plain_forward(family):
    cfg, model = make(family)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    positions, segments = packed_row_inputs()
    plain = model(tokens, positions, segments)
    every = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 2, 12))
    with_ltd = model(tokens, positions, segments, ltd=ltd.LTDPlan((1, 2), every, "xla"))
    np.testing.assert_allclose(with_ltd, plain, rtol=1e-5, atol=1e-5)
    dropped = model(tokens, positions, segments,
                    ltd=ltd.LTDPlan((1,), ltd.sample_kept_indices(jax.random.key(0), 1, 2, 12, 4), "xla"))
    assert not np.allclose(dropped, plain, atol=1e-3)


def test_layer_tokens_and_the_token_budget():
    # (S (L - k) + r k) // L: S=64, L=4, k=2, r=16 -> (128 + 32) // 4 = 40; no dropping -> 64.
    assert ltd.layer_tokens_per_row(64, 16, 4, 2) == 40
    assert ltd.layer_tokens_per_row(64, None, 4, 2) == 64 and ltd.layer_tokens_per_row(64, 80, 4, 2) == 64
    per_step = lambda t: 8 * ltd.layer_tokens_per_row(64, min(16 + 16 * t, 64), 4, 2)  # 320, 384, 448, 512...
    budget = ltd.token_budget(per_step, 10 * 8 * 64)  # the baseline: 10 steps of 8 x 64 tokens
    consumed = np.cumsum([0] + [per_step(t) for t in range(20)])
    assert budget.total_steps == int(np.argmax(consumed >= 5120)) == 11
    assert budget.consumed.tolist() == consumed[:12].tolist()


def test_layer_token_schedule():
    constant = ltd.token_budget(lambda t: 8 * 64, 100 * 8 * 64)
    mine = ltd.layer_token_schedule(3e-4, 10, 0.1, constant)
    reference = warmup_cosine(3e-4, 10, 100, 0.1)
    steps = jnp.arange(0, 120)
    np.testing.assert_allclose(jax.vmap(mine)(steps), jax.vmap(reference)(steps), rtol=2e-6, atol=1e-12)
    per_step = lambda t: 8 * ltd.layer_tokens_per_row(64, min(16 + 4 * t, 64), 4, 2)
    budget = ltd.token_budget(per_step, 100 * 8 * 64)
    sched = ltd.layer_token_schedule(1.0, 5, 0.1, budget)
    consumed = np.cumsum([0] + [per_step(t) for t in range(budget.total_steps)])
    for t in (0, 3, 5, 40, budget.total_steps - 1, budget.total_steps + 5):
        if t < 5:
            want = t / 5
        else:
            p = min((consumed[min(t, budget.total_steps)] - consumed[5]) / (100 * 8 * 64 - consumed[5]), 1.0)
            want = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p))
        assert float(sched(t)) == pytest.approx(want, rel=1e-5)
    assert budget.total_steps > 100  # fewer layer-tokens per step: more steps for the same budget
