"""Every shipped config loads, validates and dry-runs."""

import pytest

from jaxllm import config as config_lib
from jaxllm.train import train
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_dry_runs(path, tmp_path, capsys, devices):
    train(config_lib.load(path, ["mesh.data=-1"]), tmp_path / "w", dry=True)
    assert "parameters:" in capsys.readouterr().out


def test_there_are_configs():
    assert {"quickstart.yaml", "gpt2_6l_512d.yaml"} <= {p.name for p in CONFIGS}
