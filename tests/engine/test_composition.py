"""Every optimizer with every task through the one engine: three steps on a mesh with data and fsdp
axes, a kill after the step-2 checkpoint, a resume, and the losses bitwise those of the run that was
never stopped."""

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from jaxllm import config as config_lib
from jaxllm.multimodal import config as visualchat_config
from jaxllm.multimodal import train as visualchat
from jaxllm.rlhf import config as rlhf_config
from jaxllm.rlhf.__main__ import run as run_rlhf
from jaxllm.train import train
from tests.conftest import REPO
from tests.multimodal.test_train import tiny_config
from tests.test_train import TINY

pytestmark = pytest.mark.slow

MESH = ["mesh.data=2", "mesh.fsdp=4"]
RUN = ["train.steps=3", "train.log_every=1", "checkpoint.every=2", "checkpoint.async_save=false",
       "log.progress_bar=false", "log.tensorboard=false"]
# Each 1-bit optimizer leaves its exact warm-up within the three steps.
OPTIMIZERS = {
    "adamw": [],
    "onebit_adam": ["optimizer.name=onebit_adam", "optimizer.freeze_step=1"],
    "zero_one_adam": ["optimizer.name=zero_one_adam", "optimizer.var_freeze_step=1",
                      "optimizer.var_update_scaler=1", "optimizer.local_step_scaler=1",
                      "optimizer.local_step_clipper=2"],
    "onebit_lamb": ["optimizer.name=onebit_lamb", "optimizer.freeze_step=1"],
}
# The demo step-1 config (a model of its own, from scratch) at CI size, for steps 1 and 2 alike.
RLHF = ["data.synthetic_rows=400", "data.synthetic_eval_rows=16", "model.layers=1", "model.d_model=32",
        "model.heads=2", "model.max_len=24", "train.batch_size=8", "eval.every=0"]


def pretraining(workdir: Path, overrides: list[str]) -> None:
    train(config_lib.load(None, [*TINY, *overrides]), workdir)


def rlhf(stage: str, workdir: Path, overrides: list[str]) -> None:
    run_rlhf(stage, rlhf_config.load(REPO / "configs/rlhf/sft.yaml", [*RLHF, *overrides]), workdir)


PPO = ["ppo.generation_batch_size=8", "ppo.train_batch_size=8", "ppo.generation_batches=1", "ppo.ppo_epochs=1",
       "ppo.max_answer_seq_len=6", "data.max_prompt_seq_len=6", "ppo.unsupervised_data=sft"]


def ppo(workdir: Path, overrides: list[str]) -> None:
    """Step 3 from an actor and a critic trained (once, with AdamW) beside the run."""
    sources = workdir.parent.parent / "ppo_sources"
    if not (sources / "reward").is_dir():
        base = [*MESH, *RUN]
        rlhf("sft", sources / "sft", base)
        rlhf("reward", sources / "reward", [*base, f"reward.init_workdir={sources / 'sft'}"])
    rlhf("ppo", workdir, [*PPO, *overrides, f"ppo.actor_workdir={sources / 'sft'}",
                          f"ppo.critic_workdir={sources / 'reward'}"])


def visual_chat(workdir: Path, overrides: list[str]) -> None:
    base = workdir.parent / "visualchat.yaml"
    base.write_text(yaml.safe_dump(tiny_config(warmup_steps=1) | {"eval": {"accuracy": False}}))
    visualchat.train(visualchat_config.load(base, overrides), workdir)


TASKS = {"pretraining": pretraining, "sft": functools.partial(rlhf, "sft"),
         "reward": functools.partial(rlhf, "reward"), "ppo": ppo, "visualchat": visual_chat}
LOSSES = ("loss", "policy_loss", "value_loss", "reward_mean")  # PPO logs the last three


def logged_losses(workdir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in LOSSES if k in r} for r in rows if any(k in r for k in LOSSES)}


def killed_and_resumed(run, tmp_path: Path, overrides: list[str]) -> tuple[dict, dict]:
    straight = tmp_path / "straight"
    run(straight, overrides)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")  # as if killed after step 2's checkpoint
    run(resumed, overrides)
    return logged_losses(straight), logged_losses(resumed)


# The default run takes each 1-bit optimizer with a different task (AdamW with every task, and
# pretraining with the 1-bit optimizers, resume bitwise in their own tests); JAXLLM_FULL_MATRIX=1
# runs all twenty pairs (about eight minutes on two cores).
COVERING = {("sft", "onebit_adam"), ("reward", "zero_one_adam"), ("ppo", "zero_one_adam"),
            ("visualchat", "onebit_lamb")}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_optimizer_trains_every_task_and_resumes_bitwise(tmp_path, devices, task, optimizer):
    if (task, optimizer) not in COVERING and os.environ.get("JAXLLM_FULL_MATRIX") != "1":
        pytest.skip("set JAXLLM_FULL_MATRIX=1 for the full task x optimizer matrix")
    want, got = killed_and_resumed(TASKS[task], tmp_path, [*MESH, *RUN, *OPTIMIZERS[optimizer]])
    assert sorted(want) == [1, 2, 3]
    assert got == want  # bitwise: the same floats


def test_random_ltd_with_onebit_adam_resumes_bitwise(tmp_path, devices):
    schedule = "random_ltd.random_ltd_schedule."
    ltd = ["model.layers=3", "random_ltd.enabled=true", f"{schedule}min_value=8", f"{schedule}max_value=16",
           f"{schedule}schedule_config.require_steps=4", f"{schedule}schedule_config.seq_per_step=8"]
    want, got = killed_and_resumed(pretraining, tmp_path, [*MESH, *RUN, *OPTIMIZERS["onebit_adam"], *ltd])
    assert sorted(want) == [1, 2, 3] and got == want
