"""Multi-host training through `jax.distributed`: two processes on localhost, 4 fake CPU devices each.

The two-process run must log the same losses as one process with 8 devices, write metrics from
process 0 only, write Orbax checkpoints cooperatively, and resume from them (here also onto another
mesh and through the JAXLLM_* launch variables). A missing peer aborts a worker instead of raising,
so every worker runs as a subprocess under a deadline and all of them are killed if one fails.
"""

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from jaxllm import config as config_lib
from jaxllm.engine.checkpoint import saved_steps
from jaxllm.errors import UserError
from jaxllm.runtime import DIST_ENV, init_distributed
from jaxllm.train import train
from tests.conftest import PYTHON, own_stderr, subprocess_env

TINY = ["data.source=synthetic", "model.layers=2", "model.d_model=32", "model.heads=4", "model.vocab_size=128",
        "data.seq_len=16", "train.batch_size=8", "train.log_every=1", "checkpoint.every=3", "eval.every=3",
        "eval.batches=2", "log.progress_bar=false", "log.tensorboard=false"]
DEADLINE_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = subprocess_env(devices)
    for name in DIST_ENV:  # a launcher's variables in the test's own environment must not leak in
        env.pop(name, None)
    return env


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Waits for every process; kills the rest as soon as one fails or the deadline passes."""
    deadline = time.monotonic() + timeout
    outputs: list[tuple[str, str] | None] = [None] * len(procs)
    try:
        while None in outputs and time.monotonic() < deadline:
            for i, proc in enumerate(procs):
                if outputs[i] is None:
                    try:
                        outputs[i] = proc.communicate(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        pass
            if any(proc.returncode not in (None, 0) for proc in procs):
                break
    finally:
        for i, proc in enumerate(procs):
            if proc.poll() is None:
                proc.kill()
            if outputs[i] is None:
                outputs[i] = proc.communicate()
    return outputs  # type: ignore[return-value]


def run_two(workdir: Path, *overrides: str, env_launch: bool = False) -> None:
    """Trains with two processes sharing `workdir`, launched by overrides or by JAXLLM_* variables."""
    port, procs = _free_port(), []
    for pid in range(2):
        env, dist = _env(4), []
        if env_launch:
            env.update(JAXLLM_COORDINATOR=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2", JAXLLM_PROCESS_ID=str(pid))
        else:
            dist = [f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                    f"distributed.process_id={pid}"]
        cmd = [PYTHON, "-m", "jaxllm.train", f"--workdir={workdir}", *TINY, *overrides, *dist]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = _wait_all(procs, DEADLINE_S)
    for pid, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {pid} exited {proc.returncode}:\n{err[-3000:]}"


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path, devices):
    multi = tmp_path / "multi"
    run_two(multi, "train.steps=6")
    first = rows(multi)
    # Process 0 alone writes metrics: each step appears once.
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    assert saved_steps(multi / "checkpoints") == [3, 6]
    assert {p.name for p in (multi / "checkpoints/6/data").iterdir()} >= {"process_0-of-2.json",
                                                                          "process_1-of-2.json"}

    # Resume to step 9 through the launch variables, on a mesh where both processes hold all batch rows.
    run_two(multi, "train.steps=9", "mesh.data=1", "mesh.tensor=8", env_launch=True)
    resumed = rows(multi)
    assert resumed[:6] == first, "rows 1-6 were rewritten: the run restarted instead of resuming"
    assert [r["step"] for r in resumed] == list(range(1, 10))
    assert saved_steps(multi / "checkpoints") == [3, 6, 9]

    single = tmp_path / "single"
    train(config_lib.load(None, [*TINY, "train.steps=9"]), single)
    expected = rows(single)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    for got, want in zip(resumed, expected, strict=True):
        for key in ("loss", "eval_loss"):
            assert (key in got) == (key in want)
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)


def test_num_processes_without_coordinator_exits_2(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "jaxllm.train", f"--workdir={tmp_path}", "distributed.num_processes=2"],
                          capture_output=True, text=True, env=_env(4), timeout=DEADLINE_S)
    assert proc.returncode == 2
    lines = [line for line in own_stderr(proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "distributed.coordinator" in lines[0], proc.stderr


@pytest.mark.parametrize("env, key", [
    ({"JAXLLM_COORDINATOR": "127.0.0.1:1"}, "JAXLLM_NUM_PROCESSES"),
    ({"JAXLLM_COORDINATOR": "127.0.0.1:1", "JAXLLM_NUM_PROCESSES": "2", "JAXLLM_PROCESS_ID": "2"},
     "JAXLLM_PROCESS_ID"),
    ({"JAXLLM_COORDINATOR": "127.0.0.1:1", "JAXLLM_NUM_PROCESSES": "two", "JAXLLM_PROCESS_ID": "0"},
     "JAXLLM_NUM_PROCESSES"),
])
def test_bad_launch_variables_name_the_variable(monkeypatch, env, key):
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=key):
        init_distributed(config_lib.load(None, []))
