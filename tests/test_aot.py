"""`python -m jaxllm.aot`: a tiny model's train step through the real XLA TPU and GPU compilers, the
figures checked against the step's own shapes and FLOPs, and a step that cannot fit refused with the
compiler's figure and exit status 3."""

import json
import subprocess

import pytest

from jaxllm import config as config_lib
from jaxllm.aot import Target, compile_train_step
from jaxllm.errors import UserError
from jaxllm.metrics import flops_per_token
from jaxllm.models.decoder import count_params
from tests.conftest import PYTHON, REPO, subprocess_env

pytest.importorskip("libtpu", reason="the TPU compiler comes with the aot extra: pip install -e '.[aot]'")
pytestmark = pytest.mark.slow


def _needs(target: str):
    """GPU targets need the aot-gpu extra (part of the test install; an environment without it skips)."""
    if target.startswith("gpu"):
        pytest.importorskip("jax_cuda12_plugin", reason="the GPU compiler: pip install -e '.[aot-gpu]'")

TINY = ["model.layers=1", "model.d_model=64", "model.heads=4", "model.vocab_size=512", "model.max_len=128",
        "data.seq_len=128", "mesh.fsdp=4", "train.batch_size=8"]


@pytest.mark.parametrize("target", ["tpu:v5e:2x2", "gpu:h100:1x4"])
def test_tiny_train_step_compiles_and_fits(target):
    _needs(target)
    config = config_lib.load(None, TINY)
    report = compile_train_step(config, Target.parse(target))
    assert report.fits and report.error is None and report.devices == 4 and report.mesh["fsdp"] == 4
    params = count_params(config.model)["total"] * 4 / 4  # f32, sharded over fsdp 4 (norms replicated)
    assert report.parameters == pytest.approx(params, rel=0.05)
    assert report.optimizer_state == pytest.approx(2 * params, rel=0.05)
    assert report.batch == 5 * 8 * 128 * 4 // 4  # five int32/f32 [8, 128] arrays, rows over fsdp 4
    assert report.arguments >= report.parameters + report.optimizer_state + report.batch
    assert report.aliased >= report.parameters + report.optimizer_state  # the state is donated
    assert report.model_flops == flops_per_token(config.model, 128) * 8 * 128
    assert 0.9 < report.compiled_flops / report.model_flops < 1.5


def test_cli_exits_3_with_the_compilers_figure_when_the_step_does_not_fit(tmp_path):
    out = tmp_path / "report.json"
    huge = [o for o in TINY if not o.startswith(("train.batch_size", "data.seq_len", "model.max_len",
                                                 "model.vocab_size"))]
    cmd = [PYTHON, "-m", "jaxllm.aot", "--target=tpu:v5e:2x2", f"--json={out}", *huge, "model.vocab_size=4096",
           "model.max_len=512", "data.seq_len=512", "train.batch_size=8192"]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "RESOURCE_EXHAUSTED: Ran out of memory on HBM" in result.stdout
    assert "to fit: rematerialise more" in result.stdout
    report = json.loads(out.read_text())
    assert not report["fits"] and report["temporaries"] > 16 * 2**30  # the compiler's own figure


def test_a_batch_that_does_not_divide_over_the_devices_is_refused_as_train_refuses_it():
    config = config_lib.load(None, [*TINY, "train.batch_size=4", "train.grad_accum=2"])  # 2 rows, 4 devices
    with pytest.raises(UserError, match="train.batch_size"):
        compile_train_step(config, Target.parse("tpu:v5e:2x2"))


@pytest.mark.parametrize("text, message", [
    ("tpu:v5e", "expected tpu:<"), ("tpu:v9:2x2", "unknown tpu 'v9'"), ("gpu:h100:8", "expected"),
    ("gpu:h100:1x2x4", "<nodes>x<gpus per node>"), ("gpu:b200:1x8", "unknown gpu 'b200'")])
def test_bad_targets_are_named(text, message):
    with pytest.raises(UserError, match=message):
        Target.parse(text)


def test_cli_prints_the_stage_split_bubble_and_host_memory_of_a_staged_offloaded_step(tmp_path, capsys):
    from jaxllm.aot.__main__ import main

    out = tmp_path / "report.json"
    staged = [o for o in TINY if not o.startswith(("model.layers", "mesh.fsdp"))]
    assert main(["--target=tpu:v5e:2x2", f"--json={out}", *staged, "model.layers=2", "mesh.stage=2", "mesh.fsdp=2",
                 "mesh.offload=optimizer"]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    s, r, m = 2, 1, 4  # gpipe; mesh.pipeline_microbatches defaults to twice the stages
    bubble = (s - 1) / (r * m + s - 1)
    plan = report["pipeline"]
    assert (plan["stages"], plan["schedule"], plan["pipeline_microbatches"]) == (s, "gpipe", m)
    assert plan["ticks"] == r * m + s - 1 and plan["bubble"] == pytest.approx(bubble, abs=1e-12)
    assert plan["stage_blocks"] == [[[0, 0]], [[1, 1]]] and plan["rows_per_pipeline_microbatch"] == 8 // m
    assert f"bubble (S-1)/(R M + S-1) = 1/5 = {bubble:.4f}" in text and "stage 0: blocks 0; stage 1: blocks 1" in text
    # The optimizer state is on the host: the layout's bytes, the estimate's host total and the compiler's
    # host arguments; the device's arguments hold no more than the parameters and the batch beside it.
    assert report["offloaded"] == report["optimizer_state"] == report["estimate_host"] > 0
    assert report["host_arguments"] >= report["optimizer_state"]
    assert report["arguments"] < report["parameters"] + report["optimizer_state"]
    assert "host memory" in text and f"host {report['estimate_host'] / 2**30:.3f} GiB" in text
