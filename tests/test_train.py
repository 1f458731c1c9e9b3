"""End-to-end runs of `jaxllm.train`: metrics, checkpoints, crash-resume, resharding and bad input."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.data.shards import write_shards
from jaxllm.engine.checkpoint import saved_steps
from jaxllm.errors import UserError
from jaxllm.train import train
from tests.conftest import PYTHON, REPO, subprocess_env

TINY = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.vocab_size=128", "model.max_len=32",
        "data.seq_len=16", "data.synthetic_rows=256", "train.batch_size=8", "train.warmup_steps=2",
        "log.progress_bar=false", "log.tensorboard=false"]


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(workdir) if "loss" in r}


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_run_writes_metrics_eval_tensorboard_and_checkpoints(tmp_path, devices):
    cfg = config_lib.load(None, [*TINY, "train.steps=8", "train.log_every=2", "eval.every=4", "eval.batches=2",
                                 "checkpoint.every=4", "log.tensorboard=true"])
    last = train(cfg, tmp_path)
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 4, 6, 8]
    for r in logged:
        assert {"step", "loss", "lr", "tokens_per_sec", "mfu", "grad_norm", "skipped_steps"} <= set(r)
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    assert "eval_loss" in logged[2] and "eval_perplexity" in logged[4] and "eval_loss" not in logged[1]
    assert logged[4]["eval_perplexity"] == pytest.approx(np.exp(logged[4]["eval_loss"]), rel=1e-6)
    assert last["step"] == 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "4.sha256", "8", "8.sha256"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _first_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_meta", "empty"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_intact_one_resumes_bitwise(tmp_path, capsys, devices,
                                                                                     damage):
    # A constant LR after warm-up, so that the shorter first run follows the same schedule.
    args = [*TINY, "train.steps=6", "train.log_every=1", "checkpoint.every=2", "checkpoint.async_save=false",
            "train.min_lr_ratio=1.0"]
    straight = tmp_path / "straight"
    train(config_lib.load(None, args), straight)
    run = tmp_path / "run"
    train(config_lib.load(None, [*args, "train.steps=4"]), run)  # checkpoints 2 and 4
    newest = run / "checkpoints" / "4"
    if damage == "flip":  # bit rot: only the manifest can tell
        _flip(_first_data_file(newest))
    elif damage == "truncate":
        victim = _first_data_file(newest)
        victim.write_bytes(victim.read_bytes()[:10])
    elif damage == "no_meta":
        shutil.rmtree(newest / "meta")
    else:  # a later step's directory left empty
        (run / "checkpoints" / "5").mkdir()
    capsys.readouterr()
    train(config_lib.load(None, args), run)
    err = capsys.readouterr().err
    assert "is damaged" in err and "set aside as" in err and "resuming from checkpoint" in err, err
    assert losses(run) == losses(straight)  # bitwise, from the intact checkpoint
    aside = sorted(p.name for p in (run / "checkpoints").iterdir() if "damaged" in p.name)
    assert aside and aside[0] in ("4.damaged", "5.damaged")  # kept for inspection, not deleted


def test_with_every_checkpoint_damaged_the_run_stops_instead_of_starting_over(tmp_path, devices):
    args = [*TINY, "train.steps=2", "checkpoint.async_save=false"]
    train(config_lib.load(None, args), tmp_path)
    _flip(_first_data_file(tmp_path / "checkpoints" / "2"))
    with pytest.raises(UserError, match="no intact checkpoint in .*checkpoints: 2 set aside as damaged"):
        train(config_lib.load(None, [*args, "train.steps=4"]), tmp_path)
    assert (tmp_path / "checkpoints" / "2.damaged").is_dir()


def test_quickstart_command_as_printed_learns_and_ends_with_a_sample_and_a_summary(tmp_path, capsys, monkeypatch,
                                                                                  devices):
    """README's first command, from a directory with a copy of configs/ (default workdir runs/default),
    shrunk by overrides."""
    from jaxllm.train import main

    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs/quickstart.yaml", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    assert main(["--config=configs/quickstart.yaml", "train.steps=6", "train.log_every=1", "eval.every=3",
                 "eval.batches=1", "model.layers=1", "model.d_model=48", "model.heads=2", "train.batch_size=8",
                 "train.warmup_steps=1", "log.progress_bar=false", "log.tensorboard=false"]) == 0
    workdir = tmp_path / "runs" / "default"
    got = losses(workdir)
    assert len(got) == 6 and got[6] < got[1]
    assert (workdir / "data" / "tokenizer.model").exists() and (workdir / "data" / "index.json").exists()
    out = capsys.readouterr().out
    eval_loss = [r["eval_loss"] for r in rows(workdir) if "eval_loss" in r][-1]
    assert "done: 6 steps in " in out
    assert f"train loss {got[6]:.4f} at step 6, eval loss {eval_loss:.4f} at step 6" in out
    assert "metrics      runs/default/metrics.jsonl" in out and "checkpoints  runs/default/checkpoints" in out
    assert "TensorBoard" not in out  # log.tensorboard=false
    sample = next(line for line in out.splitlines() if line.startswith("sample: "))
    assert " -> " in sample and len(sample) > len("sample: '' -> ''")
    assert "python -m jaxllm.generate --workdir runs/default" in out
    # Evaluating the finished workdir again gives the eval loss its last step logged.
    assert main(["--config=configs/quickstart.yaml", "--eval-only", "eval.batches=1", "model.layers=1",
                 "model.d_model=48", "model.heads=2", "train.batch_size=8", "log.progress_bar=false"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["step"] == 6 and again["eval_loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert losses(workdir) == got  # nothing was trained or logged


def _cli(workdir: Path, *overrides: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(8)
    if fault:
        env["JAXLLM_FAULT"] = fault
    return subprocess.run([PYTHON, "-m", "jaxllm.train", f"--workdir={workdir}", *TINY, *overrides],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_kill9_after_a_step_and_during_a_save_then_resume_bitwise(tmp_path):
    args = ["train.steps=8", "train.log_every=1", "checkpoint.every=3", "mesh.data=2", "mesh.fsdp=4"]
    straight = tmp_path / "straight"
    assert _cli(straight, *args).returncode == 0
    want = losses(straight)
    assert sorted(want) == list(range(1, 9))

    killed = tmp_path / "killed"
    # Synchronous saves here so that checkpoint 3 is surely complete when the kill comes.
    crash = _cli(killed, *args, "checkpoint.async_save=false", fault="kill_after_step:5")
    assert crash.returncode == -9
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["3"]
    assert _cli(killed, *args).returncode == 0
    assert losses(killed) == want  # bitwise: the same floats

    in_save = tmp_path / "in_save"
    crash = _cli(in_save, *args, fault="kill_in_save:6")
    assert crash.returncode == -9
    finished = [p.name for p in (in_save / "checkpoints").iterdir() if p.name.isdigit()]
    assert finished == ["3"], "the save killed midway must not look like a checkpoint"
    resumed = _cli(in_save, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(in_save) == want


def test_restore_onto_a_different_mesh(tmp_path, devices):
    # A constant LR after warm-up, so that a shorter first run follows the same schedule.
    base = [*TINY, "train.log_every=1", "checkpoint.every=4", "train.min_lr_ratio=1.0"]
    straight = tmp_path / "straight"
    train(config_lib.load(None, [*base, "train.steps=6", "mesh.data=8"]), straight)
    moved = tmp_path / "moved"
    train(config_lib.load(None, [*base, "train.steps=4", "mesh.data=8"]), moved)
    train(config_lib.load(None, [*base, "train.steps=6", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), moved)
    want, got = losses(straight), losses(moved)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)


def test_workdir_with_another_model_shape_is_refused_untouched(tmp_path, devices):
    train(config_lib.load(None, [*TINY, "train.steps=2"]), tmp_path)
    before = tree_digest(tmp_path)
    with pytest.raises(UserError, match=r"holds a different model \(model.d_model: checkpoint 32, config 64;"):
        train(config_lib.load(None, [*TINY, "train.steps=4", "model.d_model=64"]), tmp_path)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], "multiply to 3, but there are 8 devices"),
    (["mesh.data=-1", "mesh.tensor=3"], r"does not divide the 8\s+devices"),
    (["mesh.data=8", "train.batch_size=12"], "do not divide over the 8 data shards"),
    (["mesh.data=2", "mesh.sequence=4", "data.seq_len=18"], "config key 'data.seq_len': 18 does not divide"),
])
def test_bad_layouts_are_refused(tmp_path, devices, overrides, message):
    with pytest.raises(UserError, match=message):
        train(config_lib.load(None, [*TINY, *overrides]), tmp_path)


def _shards(directory: Path, docs, vocab=300) -> Path:
    write_shards([np.asarray(d) for d in docs], directory, vocab_size=vocab)
    return directory


def test_resuming_on_changed_data_is_refused_naming_what_changed(tmp_path, devices):
    data = _shards(tmp_path / "data", [list(range(1, 40))] * 20)
    args = [*TINY, "data.source=tokens", f"data.path={data}", "data.eval_fraction=0"]
    train(config_lib.load(None, [*args, "train.steps=2"]), tmp_path / "run")
    _shards(tmp_path / "data", [list(range(2, 41))] * 20)  # the same shape, other token ids
    with pytest.raises(UserError, match="training data in .* changed since checkpoint 2 was written "
                                        r"\(its token shards differ\)"):
        train(config_lib.load(None, [*args, "train.steps=4"]), tmp_path / "run")
    assert saved_steps(tmp_path / "run" / "checkpoints") == [2]  # nothing set aside or overwritten


def test_a_damaged_shard_is_refused_when_the_run_starts(tmp_path, devices):
    data = _shards(tmp_path / "data", [list(range(1, 40))] * 20)
    args = [*TINY, "data.source=tokens", f"data.path={data}", "data.eval_fraction=0", "train.steps=1"]
    train(config_lib.load(None, args), tmp_path / "run")  # checked once and remembered
    assert (data / ".verified.json").is_file()
    shard = data / "shard_00000.bin"
    shard.write_bytes(bytes(shard.stat().st_size))  # zero-filled, the right size
    with pytest.raises(UserError, match="shard_00000.bin: its tokens differ from the digest in"):
        train(config_lib.load(None, [*args, "train.steps=2"]), tmp_path / "run")


def test_bad_data_is_refused(tmp_path, devices):
    tokens = ["data.source=tokens", "train.steps=1"]
    too_big = _shards(tmp_path / "big", [[1, 2, 3, 200, 5] * 20])
    with pytest.raises(UserError, match="200"):
        train(config_lib.load(None, [*TINY, *tokens, f"data.path={too_big}"]), tmp_path / "w1")

    truncated = _shards(tmp_path / "trunc", [[1, 2, 3, 4, 5] * 20])
    shard = next(truncated.glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(UserError, match=shard.name):
        train(config_lib.load(None, [*TINY, *tokens, f"data.path={truncated}"]), tmp_path / "w2")

    with pytest.raises(UserError, match="does not exist|not found|missing"):
        train(config_lib.load(None, [*TINY, *tokens, f"data.path={tmp_path / 'nowhere'}"]), tmp_path / "w3")

    # 1% of 256 rows is 3 held-out rows, fewer than one batch of 8: refused before any step, naming the keys.
    with pytest.raises(UserError, match=r"data.eval_fraction.*3 rows.*train.batch_size=8"):
        train(config_lib.load(None, [*TINY, "data.eval_fraction=0.01", "eval.every=1"]), tmp_path / "w5")
    assert not (tmp_path / "w5" / "checkpoints").exists()

    with pytest.raises(UserError, match="data.tokenizer.*nope.model"):
        train(config_lib.load(None, [*TINY, "data.source=text", f"data.tokenizer={tmp_path / 'nope.model'}"]),
              tmp_path / "w4")


def test_a_workdir_that_is_or_lies_under_a_file_is_one_error_line(tmp_path, capsys, devices):
    from jaxllm.train import main

    (tmp_path / "file").write_text("keep")
    for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main([f"--workdir={workdir}", *TINY, "train.steps=1"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --workdir {workdir}: '{tmp_path / 'file'}' is a file, not a directory\n"
    assert (tmp_path / "file").read_text() == "keep"


def test_dry_run_reports_sizes_without_writing(tmp_path, capsys, devices):
    cfg = config_lib.load(REPO / "configs/quickstart.yaml", ["mesh.data=2", "mesh.fsdp=4"])
    train(cfg, tmp_path / "w", dry=True)
    out = capsys.readouterr().out
    assert "parameters: 2,590,848" in out and "per-device memory estimate" in out
    assert "'fsdp': 4" in out
    assert "GiB (this machine's RAM over its 8 cpu devices): fits by this estimate" in out
    assert not (tmp_path / "w").exists()
    train(config_lib.load(REPO / "configs/llmjp_13b.yaml"), tmp_path / "w", dry=True)  # 26 GB of state per device
    assert "does NOT fit by this estimate" in capsys.readouterr().out
