"""docs/config_reference.md is exactly what scripts/gen_config_reference.py writes, so it cannot rot."""

import dataclasses
import importlib.util
from pathlib import Path

from jaxllm import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_reference_is_current():
    assert (ROOT / "docs" / "config_reference.md").read_text() == _generator().render(), (
        "docs/config_reference.md is out of date: run python scripts/gen_config_reference.py")


def test_reference_lists_every_section_and_key():
    text = _generator().render()
    for section in dataclasses.fields(config_lib.Config):
        if dataclasses.is_dataclass(section.type) or section.name != "seed":
            assert f"### `{section.name}`" in text
    for field in dataclasses.fields(config_lib.OptimizerConfig):
        assert f"| `{field.name}` |" in text
    assert "| `kv_heads` | `int \\| None` | `None` | None: as many as `heads` (no grouping) |" in text


def test_field_comments_reads_trailing_and_preceding_comments():
    comments = _generator().field_comments(config_lib.TrainConfig)
    assert comments["batch_size"] == "global, in sequences"
    assert comments["compile_cache"].startswith("XLA's persistent compilation cache")
    assert "steps" not in comments
