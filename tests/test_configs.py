"""Every shipped config loads, validates and dry-runs (model presets are dry-run in test_presets.py)."""

import pytest

from jaxllm import config as config_lib
from jaxllm.train import train
from tests.conftest import REPO
from tests.test_presets import ARCH

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.stem not in ARCH)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_dry_runs(path, tmp_path, capsys, devices):
    train(config_lib.load(path), tmp_path / "w", dry=True)
    assert "parameters:" in capsys.readouterr().out


def test_there_are_configs():
    assert {"quickstart.yaml", "gpt2_6l_512d.yaml"} <= {p.name for p in CONFIGS}
