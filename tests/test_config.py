import subprocess

import pytest

from jaxllm import config as config_lib
from jaxllm.errors import UserError
from tests.conftest import PYTHON, REPO, own_stderr, subprocess_env


def test_defaults_validate_and_overrides_apply():
    cfg = config_lib.load(None, ["model.family=llama", "model.kv_heads=2", "train.lr=3e-4", "model.d_ff=null",
                                 "mesh.data=-1", "checkpoint.async_save=false"])
    assert cfg.model.family == "llama" and cfg.model.kv_heads == 2 and cfg.model.d_ff is None
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.checkpoint.async_save is False
    assert cfg.model.num_kv_heads == 2 and cfg.model.ffn_dim % 64 == 0


def test_yaml_file_and_scientific_notation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  steps: 5\nmodel:\n  family: bloom\n")
    cfg = config_lib.load(path, ["train.steps=7"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.steps == 7 and cfg.model.family == "bloom"


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["model.layrs=3"], "unknown config key 'model.layrs'; did you mean 'model.layers'?"),
        (["trian.steps=3"], "unknown config key 'trian'; did you mean 'train'?"),
        (["model.layers=two"], "config key 'model.layers': got 'two' (str); expected int"),
        (["model.layers=2.5"], "expected int"),
        (["model.family=gpt3"], "expected one of 'gpt2', 'llama', 'bloom'"),
        (["model.heads=5"], "config key 'model.d_model': got 64; expected a multiple of model.heads=5"),
        (["model.kv_heads=3"], "config key 'model.kv_heads'"),
        (["train.batch_size=6", "train.grad_accum=4"], "config key 'train.batch_size'"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one axis set to -1"),
        (["data.seq_len=1024"], "at most model.max_len=512"),
        (["model.compute_dtype=float16"], "expected one of 'float32', 'bfloat16'"),
        (["model.activation=relu"], "expected one of 'gelu_tanh', 'gelu'"),
        (["model.family=llama", "model.activation=gelu"], "config key 'model.activation': got 'gelu'; expected "
                                                          "left unset for the llama family"),
        (["train.steps=0"], "config key 'train.steps': got 0; expected a positive integer"),
        (["train.lr=inf"], "config key 'train.lr': got inf; expected a positive finite number"),
        (["seed=-1"], "config key 'seed': got -1; expected an integer in [0, 2**32)"),
        (["seed=99999999999999999999999"], "config key 'seed': got 99999999999999999999999"),
        (["train.max_skipped_steps=-1"], "config key 'train.max_skipped_steps'"),
        (["train.loss_spike_factor=0.5"], "config key 'train.loss_spike_factor': got 0.5; expected 0 (off) or a "
                                          "finite number > 1"),
        (["train.loss_spike_factor=nan"], "config key 'train.loss_spike_factor': got nan"),
        (["train.loss_spike_window=0"], "config key 'train.loss_spike_window': got 0; expected a positive integer"),
        (["model.init_std=nan"], "config key 'model.init_std': got nan"),
        (["model.norm_eps=-1"], "config key 'model.norm_eps': got -1.0; expected a positive finite number"),
        (["model.rope_theta=0"], "config key 'model.rope_theta'"),
        (["optimizer.weight_decay=inf"], "config key 'optimizer.weight_decay': got inf"),
        (["optimizer.eps=inf"], "config key 'optimizer.eps': got inf"),
        (["model=3"], "config key 'model': got 3; expected a mapping"),
        (["train.steps"], "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(UserError) as err:
        config_lib.load(None, override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config_lib.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config_lib.load(tmp_path / "nope.yaml")


def test_cli_reports_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [PYTHON, "-m", "jaxllm.train", "--config", str(REPO / "configs/quickstart.yaml"),
         f"--workdir={tmp_path}", "model.d_mdoel=64"],
        capture_output=True, text=True, env=subprocess_env(1), timeout=120,
    )
    assert result.returncode == 2
    lines = own_stderr(result.stderr).strip().splitlines()
    assert lines == ["error: unknown config key 'model.d_mdoel'; did you mean 'model.d_model'?"]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "a rejected config must not write to the workdir"


def test_a_key_given_twice_in_a_yaml_mapping_is_an_error_naming_it_and_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  layers: 2\n  d_model: 64\n  layers: 64\n")
    with pytest.raises(UserError, match=r"c\.yaml' line 4: key 'layers' appears twice in one mapping"):
        config_lib.load(path)
    path.write_text("model: {layers: 2}\ntrain: {steps: 3}\n")  # the same key in two mappings is fine
    assert config_lib.load(path).model.layers == 2


def test_a_config_that_is_a_directory_or_not_utf8_is_named(tmp_path):
    with pytest.raises(UserError, match=f"config file '{tmp_path}' is a directory; expected a YAML file"):
        config_lib.load(tmp_path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.yaml' is not UTF-8 text"):
        config_lib.load(path)


def test_a_config_with_a_base_changes_only_what_it_names(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "p.yaml").write_text("model: {layers: 6, d_model: 128}\ntrain: {steps: 7}\n")
    (tmp_path / "r.yaml").write_text("base: presets/p.yaml\nmodel: {layers: 2}\n")
    config = config_lib.load(tmp_path / "r.yaml", ["train.steps=9"])
    assert (config.model.layers, config.model.d_model, config.train.steps) == (2, 128, 9)
    (tmp_path / "presets" / "p.yaml").write_text("base: ../r.yaml\n")
    with pytest.raises(UserError, match="'base' chain comes back to itself"):
        config_lib.load(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(UserError, match="missing.yaml' does not exist"):
        config_lib.load(tmp_path / "r.yaml")
