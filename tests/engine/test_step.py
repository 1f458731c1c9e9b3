"""The jitted train step: equal losses on every mesh, gradient accumulation, non-finite skipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.engine.optimizer import TrainOptimizer
from jaxllm.engine.state import ParamTree, initial_state
from jaxllm.engine.step import make_train_step
from jaxllm.optim import build_optimizer, warmup_cosine
from jaxllm.pretraining import LanguageModelTraining

STEPS = 3


def batches(cfg, n=STEPS, seed=0, repeat=False):
    rng = np.random.default_rng(seed)
    b, length = cfg.train.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        tokens = rng.integers(0, cfg.model.vocab_size, (b, length + 1)).astype(np.int32)
        seg = np.ones((b, length), np.int32)
        seg[:, length // 2:] = 2  # two documents per row
        seg[0, -3:] = 0  # and some padding
        pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
        mask = (seg != 0).astype(np.float32)
        mask[:, length // 2 - 1] = 0  # the target crossing the document boundary
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": np.tile(pos, (b, 1)).astype(np.int32), "loss_mask": mask})
    return [out[0]] * n if repeat else out


def _cfg(family, overrides=()):
    extra = ["model.kv_heads=2"] if family == "llama" else []
    return config_lib.load(None, [f"model.family={family}", "model.layers=2", "model.d_model=32", "model.heads=4",
                                  "model.vocab_size=128", "data.seq_len=16", "train.batch_size=8",
                                  "train.warmup_steps=1", *extra, *overrides])


def run(family, overrides=(), devices=None, data=None):
    cfg = _cfg(family, overrides)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(cfg, mesh)
        state = task.init_state()
        step = task.train_step()
        losses = []
        for batch in data or batches(cfg):
            batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses), state, metrics


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom"])
def test_meshes_give_the_losses_of_one_device(devices, family):
    single, _, _ = run(family, ["mesh.data=1"], devices=devices[:1])
    for shape in [(8, 1, 1), (2, 2, 2), (1, 1, 8)]:
        overrides = [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"]
        losses, _, _ = run(family, overrides)
        np.testing.assert_allclose(losses, single, rtol=1e-5, err_msg=str(shape))


def test_repeated_batch_loss_drops(devices):
    losses, _, _ = run("llama", ["mesh.data=8", "train.lr=1e-2"], data=batches(_cfg("llama"), repeat=True))
    assert losses[-1] < losses[0] - 0.05


def test_zero_stages_grad_accum_and_scanned_layers_keep_the_losses(devices):
    base, _, _ = run("gpt2", ["mesh.data=2", "mesh.fsdp=4"])
    for overrides in (["mesh.zero_stage=1"], ["mesh.zero_stage=2"], ["train.grad_accum=2"],
                      ["train.grad_accum=4", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
                      ["model.scan_layers=true", "model.remat=dots", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]):
        losses, _, _ = run("gpt2", ["mesh.data=2", "mesh.fsdp=4", *overrides])
        np.testing.assert_allclose(losses, base, rtol=1e-5, err_msg=str(overrides))


def test_non_finite_step_is_skipped_and_counted(devices):
    cfg = config_lib.load(None, ["model.layers=1", "model.d_model=32", "model.vocab_size=128", "data.seq_len=16"])
    good = batches(cfg, 2)
    bad = dict(good[1])
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][0, 0] = np.nan
    _, after_good, _ = run("gpt2", ["model.layers=1", "mesh.data=8"], data=good[:1])
    _, after_bad, metrics = run("gpt2", ["model.layers=1", "mesh.data=8"], data=[good[0], bad])
    assert int(metrics["skipped"]) == 1 and int(after_bad["skipped_steps"]) == 1
    assert int(after_bad["step"]) == 2
    jax.tree.map(np.testing.assert_array_equal, after_good["params"], after_bad["params"])
    jax.tree.map(np.testing.assert_array_equal, after_good["opt_state"], after_bad["opt_state"])


def test_schedule_follows_warmup_then_cosine():
    schedule = warmup_cosine(1.0, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    # Halfway through the decay the cosine is at its midpoint: 0.1 + 0.9 * 0.5.
    assert float(schedule(60)) == pytest.approx(0.55, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(0.1) and float(schedule(500)) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_biases():
    cfg = config_lib.load(None, ["train.warmup_steps=0", "optimizer.grad_clip=0"])
    tx, _ = build_optimizer(cfg)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert float(jnp.abs(updates["b"]).max()) == 0.0
    np.testing.assert_allclose(updates["w"], -cfg.train.lr * cfg.optimizer.weight_decay * np.ones((2, 2)), rtol=1e-6)


def test_buffers_follow_the_micro_batches_and_a_skipped_step_keeps_them():
    """A loss that keeps a running mean of its inputs in `buffers` (as XTC keeps activation ranges):
    with 2 micro-batches the buffer sees them in order, and a non-finite step leaves it unchanged."""
    def loss_fn(params, batch, ltd):
        x = batch["x"]
        loss = jnp.sum((x * params["w"]) ** 2)
        running = 0.5 * params["buffers"]["mean"] + 0.5 * jnp.mean(x)
        return loss, jnp.float32(x.shape[0]), {"buffers": {"mean": running}}

    mesh = mesh_lib.one_replica_mesh()
    opt = TrainOptimizer(optax.sgd(0.1), optax.constant_schedule(0.1))
    model = ParamTree({"w": (None,)}, {"w": (3,)})
    with jax.set_mesh(mesh):
        layout = opt.layout(mesh, model, 0, buffers={"mean": jnp.zeros(())})
        state = initial_state(layout, opt.tx, {"w": jnp.ones(3)}, {"mean": jnp.float32(0)})
        step = make_train_step(loss_fn, opt, layout, grad_accum=2)
        rows = np.arange(12, dtype=np.float32).reshape(4, 3)  # micro-batch a takes rows a and a + 2
        state, metrics = step(state, {"x": jnp.asarray(rows)})
        first, second = rows[[0, 2]].mean(), rows[[1, 3]].mean()
        np.testing.assert_allclose(state["buffers"]["mean"], 0.5 * (0.5 * first) + 0.5 * second, rtol=1e-6)
        kept = np.asarray(state["buffers"]["mean"])
        state, metrics = step(state, {"x": jnp.full((4, 3), jnp.inf)})
        assert int(metrics["skipped"]) == 1
        np.testing.assert_array_equal(state["buffers"]["mean"], kept)
