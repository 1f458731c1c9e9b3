"""The loop stops a run that has diverged: after `train.max_skipped_steps` skipped steps in a row the
command exits 2 with one line naming the steps, and writes no checkpoint after them."""

import re

from jaxllm.train import main
from tests.test_train import TINY


def test_a_diverged_run_stops_with_one_line_and_no_final_checkpoint(tmp_path, capsys, devices):
    # lr 1e30: the first full-rate step blows the weights up, every later loss is inf or nan.
    code = main([f"--workdir={tmp_path}", *TINY, "train.steps=12", "train.lr=1e30", "train.log_every=1",
                 "train.max_skipped_steps=3", "checkpoint.every=100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    found = re.search(r"error: training diverged: steps (\d+)\.\.(\d+) all had a non-finite", err[-1])
    assert found and int(found[2]) - int(found[1]) == 2, err[-1]
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_the_guard_is_off_at_zero(tmp_path, devices):
    assert main([f"--workdir={tmp_path}", *TINY, "train.steps=6", "train.lr=1e30", "train.max_skipped_steps=0",
                 "checkpoint.every=100"]) == 0
