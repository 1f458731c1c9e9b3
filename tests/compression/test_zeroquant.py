"""ZeroQuant PTQ and LKD, XTC distillation and layer reduction on tiny decoders."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.compression import model as cmodel
from jaxllm.compression import xtc, zeroquant
from jaxllm.compression.qtensor import QuantizedWeight
from jaxllm.compression.rules import Rule, module_shapes, plan
from jaxllm.config import ModelConfig
from jaxllm.data.pipeline import SyntheticRows, make_train_iterator
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef, init_params

FAMILIES = {"gpt2": {}, "llama": dict(kv_heads=2), "bloom": dict(heads=2)}


def make(family="gpt2", **extra):
    """A tiny decoder whose weights are perturbed away from their small initial values."""
    cfg = ModelConfig(**(dict(family=family, layers=2, d_model=32, heads=4, vocab_size=64, max_len=32)
                         | FAMILIES[family] | extra))
    params = init_params(cfg, 0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, noisy)
    return cfg, ModelDef.from_config(cfg), params


def tokens(seed, shape=(4, 16)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 64)


def specs_for(cfg, model_def, rules):
    return plan(cfg, rules, module_shapes(model_def.shapes, cfg))


W4_8_A8 = [Rule(("attn",), weight_bits=8, weight_groups=4, act_bits=8),
           Rule(("mlp",), weight_bits=4, weight_groups=8, act_bits=8),
           Rule(("embed",), weight_bits=8)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_integer_checkpoint_tree_runs_like_fake_quant(family):
    cfg, md, params = make(family, layers=1)
    rules = W4_8_A8 + [Rule((r"blocks\.0\.mlp",), act_bits=8, act_static=True)]
    specs = specs_for(cfg, md, rules)
    batches = [{"inputs": tokens(i)} for i in range(2)]
    stored, ranges = zeroquant.ptq(md, params, specs, batches)
    assert all(isinstance(cmodel.get_path(stored, cmodel.module_path(n)), QuantizedWeight) for n in specs)
    fake_tree = cmodel.compress_params(params, specs, ranges=ranges)
    dequantized = jax.jit(cmodel.plain_params)
    for a, b in zip(jax.tree.leaves(dequantized(stored)), jax.tree.leaves(dequantized(fake_tree)), strict=True):
        np.testing.assert_array_equal(a, b)  # integer codes x scales == fake quantization, bit for bit
    x = tokens(5)
    forward = jax.jit(lambda tree: md.bind(tree)(x))
    fake = forward(fake_tree)
    np.testing.assert_allclose(forward(stored), fake, rtol=0, atol=1e-5)  # fusion order may differ by an ulp
    f32 = forward(params)
    assert 0 < float(jnp.max(jnp.abs(fake - f32))) < 0.5 * float(jnp.max(jnp.abs(f32)))
    assert cmodel.weight_bytes(stored) < 0.4 * cmodel.weight_bytes(params)


def test_static_calibration_is_deepspeed_ema():
    cfg, md, params = make()
    specs = specs_for(cfg, md, [Rule((r"blocks\.0\.attn\.wq",), act_bits=8, act_static=True)])
    batches = [{"inputs": tokens(i)} for i in range(2)]
    ranges = zeroquant.calibrate(md, params, specs, batches)
    model = md.bind(params)
    seen = []
    for b in batches:  # the input of blocks.0.attn.wq: the first block's attention norm of the embeddings
        x = model.blocks[0].attn_norm(cmodel.forward_states(model, b["inputs"], attention=False).hidden[0])
        seen.append((float(jnp.min(x)), float(jnp.max(x))))
    low = 0.95 * seen[0][0] + 0.05 * seen[1][0]  # first batch sets the range, the second moves it by 5%
    high = 0.95 * seen[0][1] + 0.05 * seen[1][1]
    r = ranges["blocks.0.attn.wq"]
    np.testing.assert_allclose([r.low, r.high], [low, high], rtol=1e-5)


def test_lkd_reduces_each_blocks_distillation_loss():
    cfg, md, params = make("llama")
    specs = specs_for(cfg, md, [Rule(("attn", "mlp"), weight_bits=4, weight_groups=4, act_bits=8)])
    batches = [{"inputs": tokens(i)} for i in range(2)]
    student, report = zeroquant.lkd(md, params, params, specs, batches, steps=20, learning_rate=1e-3)
    assert len(report.before) == 2
    for before, after in zip(report.before, report.after, strict=True):
        assert after < 0.7 * before
    # The reported loss is MSE(student block l on the teacher's H_l, teacher H_{l+1}) with the new weights.
    hidden = cmodel.forward_states(md.bind(params), batches[0]["inputs"], attention=False).hidden
    qmodel = md.bind(cmodel.compress_params(student, specs))
    pos = _default_pos(batches[0]["inputs"])
    mse = [float(jnp.mean((cmodel.run_block(qmodel, i, hidden[i], *pos) - hidden[i + 1]) ** 2)) for i in range(2)]
    assert mse[0] < report.before[0] and mse[1] < report.before[1]
    assert student["embed"] is params["embed"]  # only the blocks change


def _default_pos(x):
    return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape), jnp.ones(x.shape, jnp.int32)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom"])
def test_attention_probs_reproduce_the_attention_output(family):
    cfg, md, params = make(family)
    model = md.bind(params)
    x = cmodel.forward_states(model, tokens(3), attention=False).hidden[1]
    positions, segments = _default_pos(x[..., 0])
    segments = segments.at[:, 10:].set(2)  # two documents per row
    from jaxllm.ops.attention import alibi_slopes

    alibi = alibi_slopes(cfg.heads) if family == "bloom" else None
    block = model.blocks[1]
    probs = cmodel.attention_probs(block, x, positions, segments, alibi)
    h = block.attn_norm(x)
    v = jnp.repeat(block.attn._project(h, block.attn.wv, block.attn.bv), cfg.heads // cfg.num_kv_heads, axis=2)
    out = block.attn._output(jnp.einsum("bhqk,bkhd->bqhd", probs, v))
    np.testing.assert_allclose(out, block.attn(h, positions, segments, alibi), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs[:, :, 12, :10], 0.0)  # no attention across documents


def test_layer_maps_follow_deepspeed():
    assert xtc.layer_maps(12, 6, [1, 3, 5, 7, 9, 11]) == ((1, 3, 5, 7, 9, 11), (0, 2, 4, 6, 8, 10, 12))
    assert xtc.layer_maps(12, 5, [2, 4, 6, 8, 10]) == ((2, 4, 6, 8, 10), (1, 3, 5, 7, 9, 11))
    assert xtc.layer_maps(12, 6) == ((1, 3, 5, 7, 9, 11), (0, 2, 4, 6, 8, 10, 12))  # 2 teacher layers per student
    assert xtc.layer_maps(4, 4) == ((0, 1, 2, 3), (0, 1, 2, 3, 4))
    assert xtc.layer_maps(4, 2, [0, 2]).hidden == (0, 1, 3)  # DeepSpeed's formula would give -1 first
    with pytest.raises(UserError, match="needs layer_reduction.teacher_layer"):
        xtc.layer_maps(4, 3)


def test_soft_cross_entropy_is_deepspeeds_mean():
    s, t = jax.random.normal(jax.random.key(0), (2, 3, 5)), jax.random.normal(jax.random.key(1), (2, 3, 5))
    p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    logq = s - np.log(np.exp(s).sum(-1, keepdims=True))
    np.testing.assert_allclose(xtc.soft_cross_entropy(s, t), np.mean(-p * logq), rtol=1e-6)
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    per = np.mean(-p * logq, axis=-1)
    np.testing.assert_allclose(xtc.soft_cross_entropy(s, t, mask), (per * mask).sum() / 3, rtol=1e-6)


def test_xtc_ternary_half_layers_reduces_the_kd_loss_and_resumes(tmp_path):
    cfg, md, params = make()
    student, scfg = cmodel.reduce_layers(params, cfg, [1])
    assert scfg.layers == 1 and student["blocks"][0] is params["blocks"][1]
    sdef = ModelDef.from_config(scfg)
    specs = specs_for(scfg, sdef, [Rule(("attn", "mlp", "embed"), weight_bits=2), Rule(("attn", "mlp"), act_bits=8)])
    config = config_lib.load(None, ["train.steps=8", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0",
                                     "train.log_every=7", "checkpoint.every=4", "checkpoint.async_save=false",
                                     "log.progress_bar=false", "log.tensorboard=false"])
    rows = SyntheticRows(cfg.vocab_size, 16, 8)  # 8 rows, batch 4: the same two batches again and again
    run = functools.partial(xtc.train_student, config, tmp_path / "xtc", md, params, sdef, student, specs,
                            maps=xtc.layer_maps(2, 1, [1]))
    result = run(make_train_iterator(rows, 4, seed=0))
    losses = [row["loss"] for row in result.history]
    assert [row["step"] for row in result.history] == [1, 7, 8]
    assert losses[-1] < 0.9 * losses[0]
    assert result.history[0]["kd_attention"] > 0 and result.history[0]["kd_hidden"] > 0
    # Killed after the step-4 checkpoint, the rerun resumes and ends on the same weights.
    shutil.rmtree(tmp_path / "xtc" / "checkpoints" / "8")
    again = run(make_train_iterator(rows, 4, seed=0))
    assert [(r["step"], r["loss"]) for r in again.history] == [(1, losses[0]), (5, again.history[1]["loss"]),
                                                                (7, losses[1]), (8, losses[2])]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.student), jax.tree.leaves(result.student),
                                                     strict=True))


def test_incompatible_teacher_and_student():
    cfg, md, params = make()
    with pytest.raises(UserError, match="incompatible shapes \\(model.d_model: teacher 32, student 48"):
        cmodel.check_compatible(cfg, ModelConfig(layers=1, d_model=48, heads=4, vocab_size=64, max_len=32))
    other_cfg, _, other = make(d_model=48)
    with pytest.raises(UserError, match=r"LKD: parameter 'blocks\.0\.attn\.bk' has shape \(4, 8\) in the teacher and "
                                        r"\(4, 12\) in the student"):
        zeroquant.lkd(md, params, other, {}, [{"inputs": tokens(0)}])
    with pytest.raises(UserError, match="layer 4 does not exist; the teacher has layers 0..1"):
        cmodel.reduce_layers(params, cfg, [0, 4])
    with pytest.raises(UserError, match="repeats a layer"):
        cmodel.reduce_layers(params, cfg, [1, 1])
    specs = specs_for(cfg, md, [Rule(("mlp",), act_bits=8, act_static=True)])
    with pytest.raises(UserError, match="'blocks.0.mlp.w_in': static activation quantization needs a calibrated range"):
        cmodel.compress_params(params, specs)
