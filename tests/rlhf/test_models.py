"""The value model, LoRA and the experience phase's coordinates, against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import mesh as mesh_lib
from jaxllm.config import ModelConfig
from jaxllm.engine import optimizer
from jaxllm.engine.state import initial_state
from jaxllm.generate import generate_tokens
from jaxllm.models.definition import ModelDef, init_params
from jaxllm.rlhf import config as rlhf_config
from jaxllm.rlhf import lora
from jaxllm.rlhf.models import ValueModel, actor_def, init_value_params, sequence_inputs, value_def
from jaxllm.rlhf.ppo_step import Experience, PPOModels, PPOUpdate, Role, answer_logprobs, answer_values

TINY = dict(layers=2, d_model=32, heads=4, vocab_size=48, max_len=32)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_value_head_reads_the_decoders_final_hidden_state(family):
    # The decoder's logit for id k is final_hidden . w_k (w_k: embedding row k, or head column k when
    # untied), so a value head set to w_k must reproduce that logit at every position.
    cfg = ModelConfig(family=family, **TINY)
    params = init_value_params(cfg, 0)
    k = 7
    w = params["decoder"]["embed"][k] if cfg.tied else params["decoder"]["head"][:, k]
    params = {**params, "value_head": w}
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    values = value_def(cfg).bind(params)(tokens)
    logits = ModelDef.from_config(cfg).bind(params["decoder"])(tokens)
    np.testing.assert_allclose(values, logits[..., k], rtol=1e-5, atol=1e-5)
    assert isinstance(value_def(cfg).bind(params), ValueModel)


def test_lora_targets_every_block_matrix_and_merge_matches_a_matrix_reference():
    cfg = ModelConfig(**TINY)
    model_def = ModelDef.from_config(cfg)
    base = init_params(cfg, 0)
    found = lora.targets(model_def.logical_axes, "blocks")
    names = sorted({path[-1] for path in found})
    assert names == ["w_in", "w_out", "wk", "wo", "wq", "wv"] and len(found) == 6 * cfg.layers
    assert set(lora.targets(model_def.logical_axes, "blocks/1/mlp")) == {("blocks", 1, "mlp", "w_in"),
                                                                         ("blocks", 1, "mlp", "w_out")}
    factors = lora.init_lora(base, model_def.logical_axes, "blocks", 4, jax.random.key(0))
    merged = lora.merge({"base": base, "lora": factors}, 0.25)
    np.testing.assert_array_equal(merged["blocks"][0]["attn"]["wq"], base["blocks"][0]["attn"]["wq"])  # B = 0
    a = factors["blocks"][0]["attn"]["wq"]["a"]
    assert a.shape == (32, 4) and float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(32)
    # non-zero B: compare with the flattened [in, out] matrices, W + s * A @ B
    factors = jax.tree.map(lambda x: x + 0.1, factors)
    merged = lora.merge({"base": base, "lora": factors}, 0.25)
    for name, n_in in (("wq", 1), ("wo", 2)):
        w = np.asarray(base["blocks"][1]["attn"][name])
        f = factors["blocks"][1]["attn"][name]
        fan_in = int(np.prod(w.shape[:n_in]))
        want = w.reshape(fan_in, -1) + 0.25 * np.asarray(f["a"]).reshape(fan_in, 4) @ np.asarray(f["b"]).reshape(4, -1)
        np.testing.assert_allclose(np.asarray(merged["blocks"][1]["attn"][name]).reshape(fan_in, -1), want,
                                   rtol=1e-5, atol=1e-6)


def test_scoring_coordinates_match_generation():
    # The experience phase scores answers with the training forward over prompt + answer; its
    # log-probabilities of the sampled tokens must equal the ones the KV-cache generation saw.
    cfg = ModelConfig(**TINY)
    model_def = ModelDef.from_config(cfg)
    params = init_params(cfg, 3)
    width, answer = 6, 5
    prompt = jnp.array([[0, 0, 0, 9, 10, 11], [0, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 4]])
    prompt_length = jnp.array([3, 5, 1])
    out = generate_tokens(model_def.bind(params), prompt, prompt_length, jax.random.key(0), max_new_tokens=answer,
                          temperature=1.0, stop_tokens=(3,), pad_id=0)
    seq = jnp.concatenate([prompt, out.tokens], axis=1)
    positions, segment_ids = sequence_inputs(prompt_length, out.lengths, width, width + answer)
    logp = answer_logprobs(model_def, params, seq, positions, segment_ids, width)
    mask = np.arange(answer)[None] < np.asarray(out.lengths)[:, None]
    np.testing.assert_allclose(np.where(mask, logp, 0), out.logprobs, rtol=1e-4, atol=1e-5)
    n = int(out.lengths[1])  # row 1: one padding slot, then 5 prompt tokens and n answer tokens
    np.testing.assert_array_equal(positions[1], [t - 1 if 1 <= t < width + n else 0 for t in range(width + answer)])
    np.testing.assert_array_equal(segment_ids[1], [int(1 <= t < width + n) for t in range(width + answer)])
    # values line up with the states before each answer token: index P - 1 + j
    vparams = init_value_params(cfg, 4)
    vals = answer_values(value_def(cfg), vparams, seq, positions, segment_ids, width)
    full = value_def(cfg).bind(vparams)(seq, positions, segment_ids)
    np.testing.assert_array_equal(vals, full[:, width - 1:-1])


def test_padded_vocabulary_is_never_sampled():
    cfg = ModelConfig(**TINY)
    model_def = actor_def(cfg, tokenizer_vocab=20)
    params = init_params(cfg, 0)
    params["embed"] = params["embed"].at[20:].set(params["embed"][20:] * 50)  # make the padded ids likely
    prompt = jnp.ones((64, 2), jnp.int32)
    out = generate_tokens(model_def.bind(params), prompt, jnp.full((64,), 2), jax.random.key(0), max_new_tokens=6,
                          temperature=1.0)
    assert int(out.tokens.max()) < 20
    assert isinstance(model_def.bind(params), nnx.Module)


def test_ppo_update_skips_minibatches_without_answer_tokens(devices):
    """A minibatch whose answers are all masked out (EOS-only answers) trains neither model: both
    skip it (counted), their parameters stay, and a minibatch with tokens still trains them."""
    config = rlhf_config.load(None, ["model.layers=1", "model.d_model=16", "model.heads=2", "model.vocab_size=32",
                                     "model.max_len=16", "ppo.train_batch_size=2", "ppo.generation_batch_size=4",
                                     "train.warmup_steps=0"])
    cfg, P, A = config.model, 4, 4
    mesh = mesh_lib.one_replica_mesh()
    a_def, c_def = ModelDef.from_config(cfg), value_def(cfg)
    models = PPOModels(Role(a_def, 0, 1.0, False), Role(c_def, 0, 1.0, False), a_def, c_def, P, A, 1, 0)
    with jax.set_mesh(mesh):
        opts = [optimizer.build(config, mesh, d) for d in (a_def, c_def)]
        layouts = [o.layout(mesh, d, 0) for o, d in zip(opts, (a_def, c_def), strict=True)]
        update = PPOUpdate(models, config.ppo, *opts, *layouts, mesh, num_rows=4, use_ema=False)
        states = [initial_state(lay, o.tx, p) for lay, o, p in
                  zip(layouts, opts, (init_params(cfg, 0), init_value_params(cfg, 1)), strict=True)]
        state = {"step": jnp.int32(0), "skipped_steps": jnp.int32(0),
                 **{k: {"params": s["params"], "opt_state": s["opt_state"]} for k, s in zip(("actor", "critic"),
                                                                                           states, strict=True)}}
        before = jax.tree.map(np.asarray, state)
        rows, width = 4, P + A
        seq = jnp.tile(jnp.arange(width, dtype=jnp.int32)[None] % 32, (rows, 1))
        ones = jnp.ones((rows, A), jnp.float32)
        mask = jnp.zeros((rows, A)).at[1].set(1.0).at[3].set(1.0)  # rows 1 and 3: minibatch 1 (rows i*2 + 1)
        exp = Experience(seq, jnp.tile(jnp.arange(width)[None], (rows, 1)), jnp.ones((rows, width), jnp.int32), mask,
                         -ones, -ones, ones * 0.1, ones, ones, ones, jnp.ones(rows), jnp.full(rows, A), jnp.ones(rows))
        state, metrics = update(state, exp, None, jax.random.key(0))
    assert int(state["skipped_steps"]) == 2 and int(state["step"]) == 1  # minibatch 0 skipped by both models
    assert np.isfinite(metrics["policy_loss"]) and np.isfinite(metrics["value_loss"])
    for name in ("actor", "critic"):
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]["params"]),
                                                             jax.tree.leaves(state[name]["params"]), strict=True)]
        assert any(changed), f"the {name} did not train on the minibatch with tokens"
