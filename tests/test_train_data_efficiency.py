"""`jaxllm.train` with random-LTD and curriculum learning: schedules as logged, the token budget, compilation
count, bitwise resume, and the curriculum sampler over an analyzer index."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import ltd
from jaxllm.data.analyze import analyze
from jaxllm.data.curriculum import difficulty_for_batch
from jaxllm.data.shards import write_shards
from jaxllm.data_efficiency import DataEfficiency
from jaxllm.engine.checkpoint import saved_steps
from jaxllm.errors import UserError
from jaxllm.train import train

TINY = ["model.layers=3", "model.d_model=16", "model.heads=2", "model.vocab_size=64", "model.max_len=32",
        "data.seq_len=32", "data.synthetic_rows=256", "train.batch_size=8", "train.warmup_steps=2",
        "train.log_every=1", "log.progress_bar=false", "log.tensorboard=false", "checkpoint.async_save=false"]
LTD = ["random_ltd.enabled=true", "random_ltd.random_ltd_schedule.min_value=16",
       "random_ltd.random_ltd_schedule.max_value=32", "random_ltd.random_ltd_schedule.schedule_config.require_steps=4",
       "random_ltd.random_ltd_schedule.schedule_config.seq_per_step=16",
       "random_ltd.layer_token_lr_schedule.enabled=true"]
SEQLEN = "curriculum.curriculum_metrics.seqlen_truncate."
CURRICULUM = ["curriculum.enabled=true", f"{SEQLEN}clustering_type=single_cluster", f"{SEQLEN}min_difficulty=16",
              f"{SEQLEN}max_difficulty=32", f"{SEQLEN}schedule_config.total_curriculum_step=2",
              f"{SEQLEN}schedule_config.difficulty_step=16"]


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_ltd_and_seqlen_curriculum_run_on_the_token_budget_and_resume_bitwise(tmp_path):
    cfg = config_lib.load(None, [*TINY, *LTD, *CURRICULUM, "train.steps=6", "eval.every=4", "eval.batches=1",
                                 "checkpoint.every=3"])
    plan = DataEfficiency.from_config(cfg)
    train(cfg, tmp_path)
    logged = rows(tmp_path)
    steps = [r["step"] for r in logged if "loss" in r]
    # Budget 6 x 8 x 32 = 1536 layer-tokens; per row (S (3 - 1) + r) // 3 with S, r from the schedules.
    per_step = [8 * ltd.layer_tokens_per_row(plan.seq_len(t), plan.kept(t), 3, 1 if plan.kept(t) else 0)
                for t in range(20)]
    assert steps == list(range(1, int(np.argmax(np.cumsum(per_step) >= 1536)) + 2))
    assert plan.total_steps == steps[-1] > 6
    sched = {"min_difficulty": 16, "max_difficulty": 32, "schedule_type": "fixed_linear",
             "schedule_config": {"total_curriculum_step": 2, "difficulty_step": 16}}
    lts = {"min_value": 16, "max_value": 32, "schedule_type": "fixed_linear",
           "schedule_config": {"require_steps": 4, "seq_per_step": 16}}
    for r in logged:
        t = r["step"] - 1
        length = difficulty_for_batch(sched, t)
        assert r["seq_len"] == length
        kept = ltd.kept_length(lts, t)
        assert r.get("kept_length") == (kept if kept < length else None)
        assert r["lr"] == pytest.approx(float(plan.lr_schedule()(jnp.int32(t))), rel=1e-6)
    # One compilation per distinct (rows, length, kept length): the lengths are bucketed by the schedules.
    # Lengths 16, 32, 32, ... (curriculum, scheduler steps 1, 2, ...) and kept 16, 16, 16, 16, 32 (LTD, 0-based):
    # (16, no drop since 16 >= 16), (32, 16), (32, no drop) -> 3 programs.
    assert logged[-1]["train_step_compilations"] == plan.compilations_bound() == 3
    assert "eval_loss" in logged[-1]  # the budget's last step is evaluated
    want = {r["step"]: r["loss"] for r in logged}

    # Programs compiled ahead on a background thread (the default) train exactly as the jitted step does.
    cfg_jit = config_lib.load(None, [*TINY, *LTD, *CURRICULUM, "train.steps=6", "eval.every=4", "eval.batches=1",
                                     "checkpoint.every=3", "train.background_compile=false"])
    train(cfg_jit, tmp_path / "jit")
    assert {r["step"]: r["loss"] for r in rows(tmp_path / "jit")} == want
    assert rows(tmp_path / "jit")[-1]["train_step_compilations"] == 3

    # Resume from step 3 (drop the later checkpoints): bitwise the same losses, kept tokens included.
    for step in saved_steps(tmp_path / "checkpoints"):
        if step > 3:
            shutil.rmtree(tmp_path / "checkpoints" / str(step))
    train(cfg, tmp_path)
    again = {r["step"]: r["loss"] for r in rows(tmp_path)}
    assert again == want


@pytest.fixture
def token_dir(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, size=rng.integers(5, 60)).tolist() for _ in range(60)]
    for d in docs[:20]:
        d[:] = [1 + (i % 3) for i in range(len(d))]  # common tokens: low rarity
    return write_shards(docs, tmp_path / "tokens", vocab_size=64)


def test_vocab_rarity_curriculum_trains_resumes_and_checks_the_index(tmp_path, token_dir):
    index = analyze(token_dir, 32, tmp_path / "index", ["vocab_rarity"], log=lambda _: None)["vocab_rarity"]
    values = np.load(index / "sample_to_metric.npy")
    metric = "curriculum.curriculum_metrics.vocab_rarity."
    args = [*TINY, "data.source=tokens", f"data.path={token_dir}", "data.eval_fraction=0", "train.steps=5",
            "checkpoint.every=2", "curriculum.enabled=true", "curriculum.seed=5",
            f"{metric}index_to_sample_path={index}", f"{metric}min_difficulty={int(np.percentile(values, 30))}",
            f"{metric}max_difficulty={int(values.max())}", f"{metric}schedule_config.total_curriculum_step=4",
            f"{metric}schedule_config.difficulty_step=1"]
    cfg = config_lib.load(None, args)
    work = tmp_path / "run"
    train(cfg, work)
    want = {r["step"]: r["loss"] for r in rows(work)}
    assert sorted(want) == [1, 2, 3, 4, 5]
    data_state = json.loads(next((work / "checkpoints" / "2" / "data").glob("*.json")).read_text())
    assert data_state["step"] == 2 and len(data_state["positions"]) >= 1  # the sampler's state is checkpointed
    for step in saved_steps(work / "checkpoints"):
        if step > 2:
            shutil.rmtree(work / "checkpoints" / str(step))
    train(cfg, work)
    assert {r["step"]: r["loss"] for r in rows(work)} == want

    # An index built with another row length describes other samples: refused before training starts.
    other = config_lib.load(None, [*args, "data.seq_len=16"])
    with pytest.raises(UserError, match="built for different data"):
        train(other, tmp_path / "other")
