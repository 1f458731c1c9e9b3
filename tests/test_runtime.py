"""The persistent compilation cache of `jaxllm.train`: where it goes, and that a second start reads it."""

import subprocess

from jaxllm import config as config_lib
from jaxllm.runtime import compile_cache_dir
from tests.conftest import PYTHON, REPO, subprocess_env

TINY = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.vocab_size=128", "model.max_len=32",
        "data.seq_len=16", "data.synthetic_rows=64", "train.batch_size=8", "train.steps=1", "mesh.data=1",
        "log.progress_bar=false", "log.tensorboard=false"]


def test_cache_location_follows_key_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compile_cache_dir(config_lib.load(None, [])) == str(tmp_path / "env")
    assert compile_cache_dir(config_lib.load(None, [f"train.compile_cache={tmp_path}/key"])) == f"{tmp_path}/key"
    assert compile_cache_dir(config_lib.load(None, ["train.compile_cache=null"])) is None
    assert compile_cache_dir(config_lib.load(None, ["train.compile_cache="])) is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_dir(config_lib.load(None, [])) == str(tmp_path / "home/.cache/jaxllm/xla")


def test_second_process_reads_the_entries_the_first_wrote(tmp_path):
    cache = tmp_path / "xla"
    env = subprocess_env(1)
    env["JAX_LOG_COMPILES"] = "1"  # logs each persistent-cache hit (a WARNING on stderr)

    def run(name: str) -> str:
        done = subprocess.run([PYTHON, "-m", "jaxllm.train", f"--workdir={tmp_path / name}", *TINY,
                               f"train.compile_cache={cache}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    run("first")
    written = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_step-") for name in written), written
    second = run("second")
    assert "Persistent compilation cache hit for 'jit_step'" in second
    assert sorted(p.name for p in cache.iterdir()) == written  # nothing recompiled, nothing new written


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path, capsys, devices):
    import os

    from jaxllm.runtime import workdir_lock
    from jaxllm.train import main
    from tests.test_train import TINY

    with workdir_lock(tmp_path / "run"):
        assert main([f"--workdir={tmp_path / 'run'}", *TINY, "train.steps=1"]) == 2
        assert f"in use by process {os.getpid()} on " in capsys.readouterr().err
    assert main([f"--workdir={tmp_path / 'run'}", *TINY, "train.steps=1"]) == 0  # released when it ended
