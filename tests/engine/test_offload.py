"""Host offload (`mesh.offload`): with the optimizer state in host memory the same losses, bit for bit
(whole update) or within float tolerance (streamed); with the parameters there too, the losses to
bf16's precision, a command-line run that resumes bitwise after a kill; checkpoints restore across the
settings; the TPU compiler's own figures show the state leaving device memory for host memory."""

import json
import subprocess

import grain
import jax
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.engine import offload
from jaxllm.engine import optimizer as optimizer_lib
from jaxllm.engine.checkpoint import Checkpointer
from jaxllm.errors import UserError
from jaxllm.pretraining import LanguageModelTraining
from tests.conftest import PYTHON, subprocess_env
from tests.engine.test_step import batches
from tests.test_train import TINY as RUN
from tests.test_train import losses

TINY = ["model.layers=1", "model.d_model=32", "model.heads=4", "model.vocab_size=128", "data.seq_len=16",
        "train.batch_size=8", "train.warmup_steps=1", "mesh.data=4", "mesh.fsdp=2"]


def _task(offload: str, overrides=()):
    cfg = config_lib.load(None, [*TINY, f"mesh.offload={offload}", *overrides])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return cfg, mesh, LanguageModelTraining.build(cfg, mesh)


def _steps(task, mesh, state, data):
    step, losses, rows = task.train_step(), [], mesh_lib.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        for batch in data:
            state, metrics = step(state, {k: jax.device_put(v, rows) for k, v in batch.items()})
            losses.append(float(metrics["loss"]))
    return state, losses


def _kinds(tree):
    """Memory kinds of a tree of arrays or of shardings."""
    return {getattr(leaf, "sharding", leaf).memory_kind for leaf in jax.tree.leaves(tree)}


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_offloaded_state_gives_the_same_losses_bit_for_bit(devices):
    cfg, mesh, plain = _task("none")
    _, _, offloaded = _task("optimizer")
    bad = dict(batches(cfg, 1, seed=1)[0])
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][0, 0] = np.nan  # a non-finite step keeps the state, offloaded or not
    data = [*batches(cfg, 3), bad]
    with jax.set_mesh(mesh):
        base_state, base = _steps(plain, mesh, plain.init_state(), data)
        state, losses = _steps(offloaded, mesh, offloaded.init_state(), data)
    assert losses[:3] == base[:3] and np.isnan(losses[3]) and int(state["skipped_steps"]) == 1
    _equal(state["params"], base_state["params"])
    _equal(state["opt_state"], base_state["opt_state"])
    assert _kinds(offloaded.layout.state["opt_state"]) == {mesh_lib.HOST_MEMORY}
    assert _kinds(state["opt_state"]) == {mesh_lib.HOST_MEMORY}
    assert _kinds(state["params"]) == {mesh_lib.DEVICE_MEMORY}
    assert _kinds(base_state["opt_state"]) == {mesh_lib.DEVICE_MEMORY}


STREAMED = ["model.family=llama", "model.layers=2", "model.scan_layers=true", "model.d_model=256",
            "model.vocab_size=1024"]


def test_stacked_blocks_stream_through_the_update_with_the_same_results(devices):
    """With stacked blocks the update runs in loops over pieces of the state (`jaxllm.engine.offload`):
    the blocks one slot at a time, the embedding in pieces of rows. Same arithmetic per element; XLA:CPU
    may round the last bit of a fused multiply-add differently inside a loop, hence the tolerance."""
    cfg, mesh, plain = _task("none", STREAMED)
    _, _, offloaded = _task("optimizer", STREAMED)
    abstract, shardings = offloaded.layout.abstract, offloaded.layout.state["opt_state"]
    assert offload.streams(shardings)
    plans, _ = offload.piece_plan(abstract["params"], abstract["opt_state"][1], shardings[1])
    plan = dict(zip([jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract["params"])],
                    plans, strict=True))
    assert plan["['blocks']['mlp']['w_in']"] == offload.Piece(axis=0, size=1, pieces=2)  # one block per iteration
    assert plan["['embed']"].axis == 0 and plan["['embed']"].pieces > 1  # [1024, 256] in pieces of rows
    assert plan["['final_norm']['scale']"] is None  # small: updated whole
    bad = dict(batches(cfg, 1, seed=1)[0])
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][0, 0] = np.nan
    data = batches(cfg, 3)
    with jax.set_mesh(mesh):
        base_state, base = _steps(plain, mesh, plain.init_state(), data[:1])
        state, losses = _steps(offloaded, mesh, offloaded.init_state(), data[:1])
        # One step: every parameter and moment within a few units in the last place.
        close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9)  # noqa: E731
        jax.tree.map(close, state["params"], base_state["params"])
        jax.tree.map(close, state["opt_state"], base_state["opt_state"])
        # More steps: the losses. (Adam's normalised step, g / (|g| + eps), turns a last-bit difference
        # of a near-zero gradient into a visible one in a few parameters, so those are not compared.)
        _, more_base = _steps(plain, mesh, base_state, data[1:])
        state, more = _steps(offloaded, mesh, state, data[1:])
        skipped, nan = _steps(offloaded, mesh, jax.tree.map(lambda x: x.copy(), state), [bad])
    np.testing.assert_allclose(losses + more, base + more_base, rtol=1e-6)
    assert np.isnan(nan[0]) and int(skipped["skipped_steps"]) == 1  # a skipped step leaves every piece as it was
    _equal(skipped["params"], state["params"])
    _equal(skipped["opt_state"], state["opt_state"])
    assert _kinds(state["opt_state"]) == {mesh_lib.HOST_MEMORY}


def test_parameters_in_host_memory_train_from_a_compute_dtype_copy(devices):
    """`mesh.offload=optimizer_and_params`: the f32 parameters stay in host memory; the passes read a
    copy with the block matrices in the compute dtype, so their gradient is rounded to it (bf16 here)
    before the f32 update, and the losses agree with the run without offload to bf16's precision."""
    bf16 = [*STREAMED, "model.compute_dtype=bfloat16"]
    cfg, mesh, plain = _task("none", bf16)
    _, _, offloaded = _task("optimizer_and_params", bf16)
    shardings = offloaded.layout.state["params"]
    assert _kinds(shardings) == {mesh_lib.HOST_MEMORY}
    data = batches(cfg, 3)
    with jax.set_mesh(mesh):
        state = offloaded.init_state()
        copy = jax.jit(lambda p: offload.compute_copy(p, shardings, "bfloat16"))(state["params"])
        # The copy: block matrices converted (one block per loop iteration), the rest as they are.
        assert copy["blocks"]["mlp"]["w_in"].dtype == jax.numpy.bfloat16
        assert copy["blocks"]["mlp_norm"]["scale"].dtype == copy["embed"].dtype == jax.numpy.float32
        _equal(copy["blocks"]["mlp"]["w_in"], state["params"]["blocks"]["mlp"]["w_in"].astype(jax.numpy.bfloat16))
        _equal(copy["embed"], state["params"]["embed"])
        assert _kinds(copy) == {mesh_lib.DEVICE_MEMORY}
        _, base = _steps(plain, mesh, plain.init_state(), data)
        state, losses = _steps(offloaded, mesh, state, data)
        held_out = offloaded.eval_step()(state["params"], jax.device_put(data[0], mesh_lib.batch_sharding(mesh)))
    np.testing.assert_allclose(losses, base, rtol=1e-4)
    assert losses[0] == base[0]  # the forward pass reads the same bf16 weights
    assert _kinds(state["params"]) == _kinds(state["opt_state"]) == {mesh_lib.HOST_MEMORY}
    assert np.isfinite(float(held_out[0]))  # the eval step brings the parameters over itself


@pytest.mark.parametrize(("saved", "resumed"), [("optimizer", "none"), ("none", "optimizer"),
                                                ("optimizer_and_params", "optimizer")])
def test_checkpoints_restore_across_the_setting(devices, tmp_path, saved, resumed):
    cfg, mesh, first = _task(saved, ["model.compute_dtype=bfloat16"])
    _, _, second = _task(resumed, ["model.compute_dtype=bfloat16"])
    data = batches(cfg, 3)
    with jax.set_mesh(mesh):
        _, uninterrupted = _steps(second, mesh, second.init_state(), data)
        state, _ = _steps(first, mesh, first.init_state(), data[:2])
        ckpt = Checkpointer(tmp_path, async_save=False)
        ckpt.save(2, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {})
        restored = ckpt.restore(2, second.layout.abstract, iter(grain.MapDataset.range(4).to_iter_dataset()))
        ckpt.close()
        _equal(restored["opt_state"], state["opt_state"])
        assert _kinds(restored["opt_state"]) == _kinds(second.layout.state["opt_state"])
        _, resumed_losses = _steps(second, mesh, restored, data[2:])
    assert resumed_losses == uninterrupted[2:]


def test_offload_is_refused_where_it_cannot_work():
    with pytest.raises(UserError, match="'mesh.offload'"):
        config_lib.load(None, ["mesh.offload=params"])
    with pytest.raises(UserError, match="'mesh.offload'.*onebit_adam"):
        _task("optimizer", ["optimizer.name=onebit_adam"])
    with pytest.raises(UserError, match="'mesh.offload'.*model.compute_dtype=float32"):
        _task("optimizer_and_params")
    cfg, mesh, task = _task("optimizer_and_params", ["model.compute_dtype=bfloat16"])
    with pytest.raises(UserError, match="'mesh.offload'.*PPO's generation reads the trained parameters"):
        optimizer_lib.build(cfg, mesh, task.model_def, reads_params="PPO's generation")
    assert optimizer_lib.offload_setting(cfg) == "optimizer_and_params"  # PPO's LoRA optimizer asks this too


@pytest.mark.slow
def test_tpu_compiler_reads_the_optimizer_state_from_host_memory():
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the aot extra: pip install -e '.[aot]'")
    from jaxllm.aot import Target, compile_train_step

    model = ["model.family=llama", "model.layers=8", "model.scan_layers=true", "model.remat=full", "model.d_model=256",
             "model.heads=4", "model.vocab_size=4096", "data.seq_len=128", "train.batch_size=2",
             "model.compute_dtype=bfloat16"]
    target = Target.parse("tpu:v5e:1x1")
    reports = {kind: compile_train_step(config_lib.load(None, [*model, f"mesh.offload={kind}"]), target)
               for kind in ("none", "optimizer", "optimizer_and_params")}
    plain, offloaded, both = reports["none"], reports["optimizer"], reports["optimizer_and_params"]
    state = plain.optimizer_state  # Adam's two moments, per chip, from the layout's shardings
    assert offloaded.offloaded == state and plain.offloaded == 0
    # The compiler's own figures: what left the device arguments is what it reads from host memory (both
    # padded to the TPU's tiles, so at least the state's bytes), written back there in place.
    assert plain.arguments - offloaded.arguments == offloaded.host_arguments >= state
    assert offloaded.host_aliased == offloaded.host_arguments
    assert plain.host_arguments == 0
    # Streamed a piece at a time, the update adds far less than the state to the device temporaries
    # (copying the whole state in adds all of it).
    assert offloaded.temporaries - plain.temporaries < state / 4
    # With the parameters too, only the batch is a device argument; the f32 parameters leave the device,
    # a bf16 copy of the block weights (most of them) stays, so the device total drops by at least half
    # the parameters' bytes more.
    assert both.offloaded == state + plain.parameters
    assert both.arguments == plain.arguments - both.host_arguments <= plain.batch + 2**20
    assert offloaded.arguments + offloaded.temporaries - both.arguments - both.temporaries >= plain.parameters / 2


@pytest.mark.slow
def test_cli_run_with_parameters_offloaded_evaluates_checkpoints_and_resumes_bitwise_after_a_kill(tmp_path):
    """`python -m jaxllm.train ... mesh.offload=optimizer_and_params` as a user types it: the loop's
    evaluation and checkpoints read the host-memory state, and a run killed after step 4 resumes from
    its step-3 checkpoint to the same losses, bit for bit, as a run never killed."""
    args = [*RUN, "train.steps=5", "train.log_every=1", "eval.every=5", "eval.batches=1", "checkpoint.every=3",
            "checkpoint.async_save=false", "mesh.data=4", "mesh.fsdp=2", "model.scan_layers=true",
            "model.compute_dtype=bfloat16", "mesh.offload=optimizer_and_params"]

    def run(workdir, fault=None):
        env = subprocess_env(8) | ({"JAXLLM_FAULT": fault} if fault else {})
        return subprocess.run([PYTHON, "-m", "jaxllm.train", f"--workdir={workdir}", *args], capture_output=True,
                              text=True, env=env, timeout=300)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert run(tmp_path / "killed", fault="kill_after_step:4").returncode == -9
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = losses(tmp_path / "straight")
    assert sorted(want) == [1, 2, 3, 4, 5] and losses(tmp_path / "killed") == want
    evals = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("eval_loss", np.nan)) for r in evals)
