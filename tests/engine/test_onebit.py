"""Training with the 1-bit optimizers: fsdp sharding, HLO traffic per phase, bitwise resume, bad input."""

import shutil
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.engine.onebit import OneBitTraining, hlo_collectives, local_shape
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef
from jaxllm.optim import padded_size
from jaxllm.optim.zero_one_adam import COMPRESSED_GRADIENT, EXACT_VARIANCE, LOCAL, SYNC
from jaxllm.pretraining import LanguageModelTraining
from jaxllm.train import train
from tests.engine.test_step import batches
from tests.test_train import TINY, losses

# 0/1 Adam with a short warm-up: variance refreshes and 1-bit gradient steps up to step 6, then syncs
# at steps 7, 8, 10 and 12 with local steps (9, 11) between (see ZeroOneAdamSchedule).
ZERO_ONE = [*TINY, "model.layers=1", "train.steps=12", "train.lr=1e-2", "optimizer.name=zero_one_adam",
            "optimizer.var_freeze_step=5", "optimizer.var_update_scaler=2", "optimizer.local_step_scaler=2",
            "optimizer.local_step_clipper=4"]
ZERO_ONE_PHASES = [EXACT_VARIANCE] * 4 + [COMPRESSED_GRADIENT, EXACT_VARIANCE, SYNC, SYNC, LOCAL, SYNC, LOCAL, SYNC]
LAMB = [*TINY, "model.layers=1", "train.steps=12", "train.lr=1e-2", "optimizer.name=onebit_lamb",
        "optimizer.freeze_step=5"]


def test_zero_one_adam_with_fsdp_learns_and_resumes_bitwise_mid_interval(tmp_path, devices):
    args = [*ZERO_ONE, "train.log_every=1", "checkpoint.every=9", "mesh.data=2", "mesh.fsdp=4",
            "checkpoint.async_save=false"]
    plan = _task(*_setup(args)[:2]).optimizer.onebit.plan
    assert [plan.phase(t) for t in range(1, 13)] == ZERO_ONE_PHASES
    straight = tmp_path / "straight"
    train(config_lib.load(None, args), straight)
    want = losses(straight)
    assert sorted(want) == list(range(1, 13))
    assert want[12] < want[1] - 0.2, want

    # Step 9 is a local step: the checkpoint holds per-device local progress, momenta and error buffers.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    train(config_lib.load(None, args), resumed)
    assert losses(resumed) == want  # bitwise: the same floats

    # Per-device state is bound to its mesh and optimizer: anything else is refused before restoring.
    for other in (["mesh.data=8", "mesh.fsdp=1"], ["optimizer.name=adamw"]):
        bad = [a for a in args if not a.startswith("optimizer.")] if other == ["optimizer.name=adamw"] else args
        with pytest.raises(UserError, match="only resume on the mesh that wrote them"):
            train(config_lib.load(None, [*bad, "train.steps=14", *other]), resumed)


def _setup(overrides):
    cfg = config_lib.load(None, overrides)
    return cfg, mesh_lib.make_mesh(cfg.mesh), ModelDef.from_config(cfg.model)


def _task(cfg, mesh):
    with jax.set_mesh(mesh):
        return LanguageModelTraining.build(cfg, mesh)


def _mesh(shape):
    return [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}"]


def _run(overrides, steps, data):
    cfg, mesh, _ = _setup(overrides)
    task = _task(cfg, mesh)
    with jax.set_mesh(mesh):
        state = task.init_state()
        step = task.train_step()
        out = []
        for batch in data[:steps]:
            batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
    return np.array(out), state


def test_onebit_lamb_warmup_is_mesh_independent_and_sharded_compression_learns(devices):
    """Exact phases average gradients exactly, so neither the layout nor gradient accumulation may change
    the losses (LAMB's norms cover whole tensors even when the optimizer sees shards); the compressed phase
    then keeps learning."""
    data = batches(config_lib.load(None, TINY), 12, repeat=True)
    base, _ = _run([*LAMB, *_mesh((8, 1, 1))], 4, data)
    got, state = _run([*LAMB, *_mesh((2, 2, 2)), "train.grad_accum=2"], 12, data)
    np.testing.assert_allclose(got[:4], base, rtol=2e-5)
    assert got[-1] < got[4] - 0.02 and got[-1] == got.min(), got
    assert int(state["skipped_steps"]) == 0


@pytest.mark.slow  # two short runs, two phases each
def test_onebit_adam_with_stages_follows_the_run_without_them(devices):
    """Stages compose with the compressed exchanges, which run over `data` only: 2 stages x data 4 give the
    losses of data 4 x fsdp 2, whose optimizer shards the parameters the same way (over `fsdp` instead of
    `stage`), over two exact steps and two compressed ones. The parameters are not compared entry by entry:
    the pipeline sums a gradient in another order, and an entry of the momentum within rounding of zero
    can take the other sign in its 1-bit code."""
    # Llama: no biases, so fewer parameter leaves to compress, which keeps the four compiles short.
    args = [*TINY, "model.family=llama", "train.steps=4", "train.lr=1e-2", "optimizer.name=onebit_adam",
            "optimizer.freeze_step=2"]
    plan = _task(*_setup(args)[:2]).optimizer.onebit.plan
    assert [plan.names[plan.phase(t)] for t in range(1, 5)] == ["exact", "exact", "compressed", "compressed"]
    data = batches(config_lib.load(None, TINY), 4)
    want, unstaged = _run([*args, *_mesh((4, 2, 1))], 4, data)
    got, staged = _run([*args, *_mesh((4, 1, 1)), "mesh.stage=2", "mesh.pipeline_microbatches=2"], 4, data)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert int(staged["skipped_steps"]) == int(unstaged["skipped_steps"]) == 0


def _data_crossing(collectives, mesh):
    per_slice = mesh.devices.size // mesh.shape["data"]
    return [c for c in collectives if not c.groups or len({i // per_slice for i in c.groups[0]}) > 1]


@pytest.mark.parametrize("mesh_shape, phases", [((2, 4, 1), (EXACT_VARIANCE, COMPRESSED_GRADIENT, LOCAL, SYNC)),
                                                ((8, 1, 1), (LOCAL, SYNC))])
def test_each_phase_moves_only_what_it_should_over_the_data_axis(devices, mesh_shape, phases):
    cfg, mesh, _ = _setup([*ZERO_ONE, *_mesh(mesh_shape)])
    task = _task(cfg, mesh)
    training = task.optimizer.onebit
    data = mesh_shape[0]
    with jax.set_mesh(mesh):
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh_lib.batch_sharding(mesh))
                 for k, v in batches(cfg, 1)[0].items()}
        step = task.train_step()
        text = {phase: step.program(phase).lower(task.layout.abstract, batch).compile().as_text()
                for phase in phases}
    found = {phase: _data_crossing(hlo_collectives(t), mesh) for phase, t in text.items()}
    # What each device holds of every parameter: its shards under the optimizer-state layout.
    local = [int(np.prod(local_shape(shape, spec, mesh))) for shape, spec in zip(
        jax.tree.leaves(task.model_def.shapes, is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree.leaves(training.opt_specs, is_leaf=lambda x: isinstance(x, P)), strict=True)]
    assert found[LOCAL] == [], found[LOCAL]  # a local step communicates nothing over the data axis
    for phase in {COMPRESSED_GRADIENT, SYNC} & set(phases):
        kinds = sorted((c.kind, c.dtypes) for c in found[phase])
        assert kinds == [("all-gather", ("f32",)), ("all-gather", ("f32",)), ("all-gather", ("u8",)),
                         ("all-to-all", ("u8",))], kinds
        for c in found[phase]:
            if c.dtypes == ("u8",):  # one sign bit per entry of this device's shards (padded), per phase
                assert c.elements == sum(padded_size(n, data) for n in local) // 8, c
            else:  # the scales: one per leaf and device
                assert c.elements == data * len(local), c
    if EXACT_VARIANCE in phases:  # the full-precision average of this device's gradient shards
        exact = found[EXACT_VARIANCE]
        assert {(c.kind, c.dtypes) for c in exact} == {("all-reduce", ("f32",))}
        assert sum(c.elements for c in exact) == sum(local)


def test_bf16_variance_refreshes_cross_the_data_axis_as_16_bit_words(devices):
    cfg, mesh, _ = _setup([*ZERO_ONE, *_mesh((8, 1, 1)), "optimizer.exact_allreduce_dtype=bfloat16"])
    task = _task(cfg, mesh)
    with jax.set_mesh(mesh):
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh_lib.batch_sharding(mesh))
                 for k, v in batches(cfg, 1)[0].items()}
        text = task.train_step().program(EXACT_VARIANCE).lower(task.layout.abstract, batch).compile().as_text()
    found = _data_crossing(hlo_collectives(text), mesh)
    n = sum(int(np.prod(s)) for s in jax.tree.leaves(task.model_def.shapes, is_leaf=lambda x: isinstance(x, tuple)))
    padded = n + -n % 8
    # All of the gradient as bf16 shares in an all-to-all, the reduced eighths back in an all-gather.
    assert sorted((c.kind, c.dtypes, c.elements) for c in found) == [("all-gather", ("u16",), padded),
                                                                       ("all-to-all", ("u16",), padded)], found


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.name=onebitadam"], "expected one of 'adamw', 'onebit_adam', 'zero_one_adam', 'onebit_lamb'"),
    (["optimizer.name=onebit_adam", "optimizer.freez_step=3"],
     "unknown config key 'optimizer.freez_step'; did you mean 'optimizer.freeze_step'"),
    (["optimizer.name=onebit_adam", "optimizer.var_freeze_step=3"],
     "'optimizer.var_freeze_step' applies to optimizer.name=zero_one_adam, not 'onebit_adam'"),
    (["optimizer.freeze_step=3"],
     "'optimizer.freeze_step' applies to optimizer.name=onebit_adam or onebit_lamb, not 'adamw'"),
    (["optimizer.name=zero_one_adam", "optimizer.local_step_clipper=0"], "optimizer.local_step_clipper': got 0"),
    (["optimizer.name=onebit_lamb", "optimizer.bias_correction=true"],
     "'optimizer.bias_correction': got True; expected false unless optimizer.name is onebit_adam or zero_one_adam "
     "\\(it is 'onebit_lamb'"),
    (["optimizer.exact_allreduce_dtype=bfloat16"],
     "'optimizer.exact_allreduce_dtype': got 'bfloat16'; expected float32 with optimizer.name=adamw"),
    (["optimizer.name=zero_one_adam", "optimizer.exact_allreduce_dtype=float16"], "optimizer.exact_allreduce_dtype"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        config_lib.load(None, overrides)


def test_config_warnings():
    with pytest.warns(UserWarning, match="freeze_step=100000 is not below train.steps=100: every step is a warm-up"):
        config_lib.load(None, ["optimizer.name=onebit_lamb"])
    with pytest.warns(UserWarning, match="var_freeze_step=50 is not below train.steps - 1 = 9"):
        config_lib.load(None, ["optimizer.name=zero_one_adam", "optimizer.var_freeze_step=50", "train.steps=10"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_lib.load(None, ["optimizer.name=onebit_adam", "optimizer.freeze_step=10", "train.steps=20"])
    with pytest.warns(UserWarning, match="data axis of size 1 .* there is nothing to compress"):
        OneBitTraining(*_setup([*TINY, "optimizer.name=onebit_adam", "optimizer.freeze_step=2", "train.steps=4",
                                    "mesh.data=1", "mesh.fsdp=8"]))
