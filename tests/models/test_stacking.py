"""Stacked block weights in the training state: the layouts, the conversions between them, weight decay
on stacked weights, and checkpoints crossing layouts (resume, generation, Hugging Face export)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import ModelConfig
from jaxllm.mesh import PipelineSettings
from jaxllm.models.definition import ModelDef, init_params
from jaxllm.models.stacking import BlockSlots, abstract_in_layout, convert_blocks, is_stacked

CFG = ModelConfig(family="llama", layers=5, d_model=32, heads=4, kv_heads=2, vocab_size=64, max_len=16)
CIRCULAR = BlockSlots.of(5, PipelineSettings(2, "circular", 2, 4))


def test_layouts_hold_each_stages_slots_contiguously():
    assert BlockSlots.of(5) == BlockSlots((0, 1, 2, 3, 4))
    # 2 stages x 2 groups x 2 slots; groups r * S + s run in order: 0 = (0, 1), 1 = (2, pad), 2 = (3, pad),
    # 3 = (4, pad); stage 0 holds groups 0 and 2, stage 1 groups 1 and 3.
    assert CIRCULAR.layer == (0, 1, 3, -1, 2, -1, 4, -1)
    assert CIRCULAR.position(3) == 2 and CIRCULAR.active.tolist() == [True, True, True, False, True, False, True, False]


def test_conversions_round_trip_through_optimizer_states():
    params = init_params(CFG, 0)
    state = optax.adam(1e-3).init(params)  # tuples of named tuples holding trees that mirror the params
    tree = {"params": params, "opt_state": jax.tree.map(lambda x: x + 1.0, state)}
    natural, circular = BlockSlots.of(5), CIRCULAR
    stacked = convert_blocks(tree, None, circular, 5)
    assert is_stacked(stacked["params"]["blocks"]) and is_stacked(stacked["opt_state"][0].mu["blocks"])
    wq = stacked["params"]["blocks"]["attn"]["wq"]
    np.testing.assert_array_equal(wq[2], params["blocks"][3]["attn"]["wq"])
    np.testing.assert_array_equal(wq[3], 0)  # padding
    moved = convert_blocks(stacked, circular, natural, 5)
    np.testing.assert_array_equal(moved["params"]["blocks"]["attn"]["wq"][3], params["blocks"][3]["attn"]["wq"])
    back = convert_blocks(moved, natural, None, 5)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    # Fresh stacked parameters are the per-block ones stacked: same initial model either way.
    jax.tree.map(np.testing.assert_array_equal, init_params(CFG, 0, circular), stacked["params"])


def test_abstract_in_layout_reads_what_the_other_layout_saved(devices):
    mesh = jax.make_mesh((2, 4), ("stage", "fsdp"), devices=devices)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("stage", "fsdp"))
    current = {"params": {"blocks": {"w": jax.ShapeDtypeStruct((8, 4, 3), jnp.float32, sharding=sharding)}}}
    per_block = abstract_in_layout(current, None, CIRCULAR, 5)["params"]["blocks"]
    assert sorted(per_block) == list(range(5)) and per_block[4]["w"].shape == (4, 3)
    assert per_block[4]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    natural = abstract_in_layout(current, BlockSlots.of(5), CIRCULAR, 5)["params"]["blocks"]["w"]
    assert natural.shape == (5, 4, 3) and natural.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_weight_decay_skips_stacked_norms():
    from jaxllm import config as config_lib
    from jaxllm.optim import build_optimizer

    config = config_lib.load(None, ["optimizer.weight_decay=0.5", "optimizer.grad_clip=0", "train.warmup_steps=0"])
    tx, _ = build_optimizer(config)
    params = init_params(CFG, 0, BlockSlots.of(5))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert not np.any(updates["blocks"]["attn_norm"]["scale"])  # [slots, d]: a norm, not a matrix
    assert np.all(updates["blocks"]["attn"]["wq"] != 0) and np.all(updates["embed"] != 0)


def test_scanned_model_is_the_same_function_of_stacked_weights():
    per_block, stacked = init_params(CFG, 0), init_params(CFG, 0, BlockSlots.of(5))
    tokens = jnp.arange(24).reshape(2, 12) % CFG.vocab_size
    scanned = ModelDef.from_config(CFG, BlockSlots.of(5))
    unrolled = ModelDef.from_config(CFG)
    np.testing.assert_allclose(scanned.bind(stacked)(tokens), unrolled.bind(per_block)(tokens), rtol=1e-5, atol=1e-5)
    assert scanned.logical_axes["blocks"]["attn"]["wq"][0] == "layers"


@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
    """A short pretraining run whose state keeps the blocks stacked (model.scan_layers)."""
    from jaxllm import config as config_lib
    from jaxllm.train import train
    from tests.test_train import TINY

    workdir = tmp_path_factory.mktemp("scanned")
    overrides = [*TINY, "model.layers=3", "model.scan_layers=true", "train.steps=2", "train.log_every=1",
                 "checkpoint.every=2", "checkpoint.async_save=false", "mesh.data=2", "mesh.fsdp=4"]
    train(config_lib.load(None, overrides), workdir)
    return workdir, overrides


def test_stacked_checkpoint_loads_per_block_for_generation_and_export(scanned_run, devices):
    from jaxllm.config import MeshConfig
    from jaxllm.engine.checkpoint import Checkpointer
    from jaxllm.generate import load_workdir
    from jaxllm.interop.convert import read_checkpoint_params
    from jaxllm.mesh import make_mesh

    workdir, _ = scanned_run
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    slots = BlockSlots(tuple(ckpt.read_meta(2)["block_slots"]))
    ckpt.close()
    assert slots == BlockSlots.of(3)
    exported, cfg = read_checkpoint_params(workdir / "checkpoints" / "2")
    assert sorted(exported["blocks"]) == [0, 1, 2]
    model, step = load_workdir(workdir, make_mesh(MeshConfig(data=8), devices))
    assert step == 2 and model.slots is None
    np.testing.assert_array_equal(model.blocks[2].mlp.w_in[...], exported["blocks"][2]["mlp"]["w_in"])
    stacked = ModelDef.from_config(cfg, slots).bind(convert_blocks(jax.tree.map(jnp.asarray, exported), None, slots, 3))
    tokens = jnp.arange(16).reshape(2, 8) % cfg.vocab_size
    np.testing.assert_allclose(model(tokens), stacked(tokens), rtol=1e-5, atol=1e-5)


def test_run_resumes_across_the_stacked_and_per_block_layouts(scanned_run, tmp_path):
    """A checkpoint with stacked blocks resumes in a run that keeps one entry per block, and back; the
    losses follow the run that never switched."""
    import shutil

    from jaxllm import config as config_lib
    from jaxllm.train import train
    from tests.test_train import losses

    workdir, overrides = scanned_run
    through = [*overrides, "train.steps=4"]
    train(config_lib.load(None, through), tmp_path / "straight")
    shutil.copytree(workdir, tmp_path / "switched")
    unscanned = [o for o in overrides if o != "model.scan_layers=true"] + ["train.steps=3"]
    train(config_lib.load(None, unscanned), tmp_path / "switched")  # stacked -> one entry per block
    train(config_lib.load(None, through), tmp_path / "switched")  # and back
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "switched")
    np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)], rtol=1e-5)


def test_per_block_parameters_enter_a_stacked_state(devices):
    """What Hugging Face import and SFT's earlier stage hand over: one entry per block, loaded into
    `load_shardings()`, stacked by `init_state` into what a fresh initialisation holds."""
    from jaxllm import config as config_lib
    from jaxllm.mesh import make_mesh
    from jaxllm.pretraining import LanguageModelTraining
    from tests.test_train import TINY

    config = config_lib.load(None, [*TINY, "model.layers=3", "model.scan_layers=true", "mesh.data=2", "mesh.fsdp=4"])
    mesh = make_mesh(config.mesh, devices)
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(config, mesh)
        shardings = task.load_shardings()
        assert sorted(shardings["blocks"]) == [0, 1, 2]
        params = jax.jit(lambda: init_params(config.model, config.seed), out_shardings=shardings)()
        state, fresh = task.init_state(params), task.init_state()
    jax.tree.map(np.testing.assert_array_equal, state["params"], fresh["params"])
