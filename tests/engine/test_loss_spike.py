"""The loss-spike guard (`train.loss_spike_factor`): its running mean against a plain EMA, an outlier
batch skipped by the AdamW and the 1-bit steps alike, and checkpoints resuming with the guard switched
on or off."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import mesh as mesh_lib
from jaxllm.engine.loss_spike import KEY, LossSpikeGuard
from jaxllm.pretraining import LanguageModelTraining
from jaxllm.train import main
from tests.engine.test_step import _cfg, batches
from tests.test_train import TINY


def test_running_mean_is_the_bias_corrected_ema_of_accepted_losses():
    guard = LossSpikeGuard(factor=2.0, window=4)
    losses = [5.0, 4.0, 9.0, 3.5, 3.0, 30.0, 2.5]
    accepted = [True, True, False, True, True, False, True]
    state = guard.init()
    ema, n, d = 0.0, 0, 1 - 1 / 4
    for loss, ok in zip(losses, accepted, strict=True):
        state = guard.update(state, jnp.float32(loss), jnp.bool_(ok), jnp.bool_(not ok))
        if ok:
            ema, n = d * ema + (1 - d) * loss, n + 1
    want = ema / (1 - d ** n)
    np.testing.assert_allclose(float(guard.mean(state)), want, rtol=1e-6)
    assert int(state["accepted"]) == 5 and int(state["spikes"]) == 2
    assert bool(guard.is_spike(state, jnp.float32(2.01 * want)))
    assert not bool(guard.is_spike(state, jnp.float32(1.99 * want)))
    young = guard.update(guard.init(), jnp.float32(1.0), jnp.bool_(True), jnp.bool_(False))
    assert not bool(guard.is_spike(young, jnp.float32(1e6)))  # fewer than `window` accepted steps: off


def _steps(overrides, data):
    """(loss, state on the host) after each step of a tiny GPT-2 on 8 data-parallel devices."""
    cfg = _cfg("gpt2", ["mesh.data=8", "train.lr=1e-2", *overrides])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    out = []
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(cfg, mesh)
        state, step = task.init_state(), task.train_step()
        for batch in data:
            state, metrics = step(state, {k: jax.device_put(v, mesh_lib.batch_sharding(mesh))
                                          for k, v in batch.items()})
            out.append((float(metrics["loss"]), jax.device_get(state)))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "onebit_adam"])
def test_an_outlier_batch_is_skipped_and_the_run_goes_on(devices, optimizer):
    cfg = _cfg("gpt2")
    seen, outlier = batches(cfg, n=1)[0], batches(cfg, n=1, seed=7)[0]
    data = [seen] * 5 + [outlier, seen]  # five steps learn one batch; a fresh one then looks like a spike
    extra = ["optimizer.name=onebit_adam", "optimizer.freeze_step=4"] if optimizer != "adamw" else []
    guarded = _steps([*extra, "train.loss_spike_factor=1.02", "train.loss_spike_window=2"], data)
    plain = _steps(extra, data[:6])

    losses = [loss for loss, _ in guarded]
    assert losses[:5] == sorted(losses[:5], reverse=True)  # learning: no spike among them
    np.testing.assert_allclose(losses[:6], [loss for loss, _ in plain], rtol=1e-5)  # the guard changes no arithmetic
    assert losses[5] > 1.02 * np.mean(losses[3:5])
    before, spiked, after = guarded[4][1], guarded[5][1], guarded[6][1]
    for key in ("params", "opt_state"):
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before[key], spiked[key]))), key
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, plain[4][1]["params"], plain[5][1]["params"])))
    assert int(spiked["skipped_steps"]) == 1 and int(spiked[KEY]["spikes"]) == 1
    assert int(after[KEY]["accepted"]) == 6 and int(after["skipped_steps"]) == 1
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, spiked["params"], after["params"])))


def test_checkpoints_resume_with_the_guard_switched_on_and_off(tmp_path, devices):
    rows = lambda w: [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    common = [*TINY, "train.log_every=1", "checkpoint.every=2"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    for workdir in (ref, run):  # the same pieces, as the learning rate's decay follows train.steps
        assert main([f"--workdir={workdir}", *common, "train.steps=4"]) == 0
    assert main([f"--workdir={ref}", *common, "train.steps=6"]) == 0
    guard = ["train.loss_spike_factor=3", "train.loss_spike_window=2"]
    assert main([f"--workdir={run}", *common, "train.steps=6", *guard]) == 0  # a checkpoint without the guard
    assert main([f"--workdir={run}", *common, "train.steps=8"]) == 0  # a checkpoint with it, guard now off
    got, want = rows(run), rows(ref)
    assert [r["step"] for r in got] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in got[:6]], [r["loss"] for r in want], rtol=1e-6)
    assert [r.get("loss_spikes") for r in got[4:]] == [0, 0, None, None]
