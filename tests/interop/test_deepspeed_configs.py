"""DeepSpeed configs as users find them (tests/interop/ds_configs/, written from the examples of DeepSpeed's
tutorials and the Hugging Face Trainer's DeepSpeed guide) through jaxllm.interop.deepspeed, and the commands
of docs/migrating_from_deepspeed.md as printed."""

import contextlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from jaxllm import config as config_lib
from jaxllm import train as train_lib
from jaxllm.errors import UserError
from jaxllm.interop import deepspeed, deepspeed_data_efficiency
from tests.conftest import REPO

CONFIGS = Path(__file__).parent / "ds_configs"
EXAMPLES = sorted(path.name for path in CONFIGS.glob("*.json"))


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def translate(ds, *overrides, devices=None, model=None):
    """`python -m jaxllm.interop.deepspeed` in process: `ds` a file name or a dict, `model` the --model path."""
    ds = load(ds) if isinstance(ds, str) else ds
    preset = config_lib.read_yaml(REPO / model if model else deepspeed.DEFAULT_PRESET)
    if not (overrides or devices is not None or model):
        return deepspeed.translate(ds, preset)
    return deepspeed.translate(ds, preset, list(overrides), devices, f"--model={model}" if model else None)


def paths(tree: dict, prefix: str = ""):
    """(dotted key path, value) for every key of a JSON object."""
    for key, value in tree.items():
        yield f"{prefix}{key}", value
        if isinstance(value, dict):
            yield from paths(value, f"{prefix}{key}.")


def dry_run_activations(tmp_path, config: dict, capsys, *overrides) -> float:
    """`python -m jaxllm.train --dry-run` (in process, 8 devices) on `config`; its activation estimate in GiB."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert train_lib.main([f"--config={path}", f"--workdir={tmp_path / 'w'}", "--dry-run", *overrides]) == 0
    return float(re.search(r"activations ([0-9.]+) GiB", capsys.readouterr().out).group(1))


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_translates_and_lists_what_it_leaves(name):
    ds = load(name)
    config, notes = translate(name)
    keys = {key for key, _ in notes}
    in_file = dict(paths(ds))
    for key in keys:  # each note names a key of the file (or a documented default inside one of its sections)
        assert key.startswith("(") or key in in_file or key.rpartition(".")[0] in in_file, key
    assert set(ds) & set(deepspeed.UNTRANSLATED_SECTIONS) <= keys
    assert {key for key, value in in_file.items() if value == "auto"} <= keys
    assert yaml.safe_load(deepspeed.render(config, notes, name)) == config


def test_hugging_face_auto_values_come_from_the_command_line(tmp_path, capsys):
    config, notes = translate("hf_trainer_zero3_auto.json", "train.lr=2e-5", "train.batch_size=64",
                              "train.grad_accum=4", "optimizer.weight_decay=0.0", "train.warmup_steps=7")
    assert config["train"]["lr"] == 2e-5 and config["train"]["warmup_steps"] == 7
    assert config["train"]["batch_size"] == 64 and config["train"]["grad_accum"] == 4
    assert config["optimizer"]["weight_decay"] == 0.0 and config["mesh"]["zero_stage"] == 3
    reasons = dict(notes)
    assert "from the command line" in reasons["optimizer.params.weight_decay"]
    assert "from the command line" in reasons["scheduler.params.warmup_max_lr"]
    # What no option sets is left to jaxllm: b2 and the clipping are jaxllm's defaults.
    run = config_lib.from_dict(config)
    assert run.optimizer.b2 == config_lib.OptimizerConfig.b2 and run.optimizer.grad_clip == 1.0
    assert "jaxllm's default" in reasons["gradient_clipping"]
    dry_run_activations(tmp_path, config, capsys)


def test_micro_batch_and_devices_give_grad_accum(tmp_path, capsys):
    ds = load("onebit_adam_bert.json")
    micro = ds["train_micro_batch_size_per_gpu"]
    for devices, extra, world in ((None, (), 1), (8, (), 8), (None, ("mesh.data=4",), 4), (16, (), 16)):
        train = translate(ds, *extra, devices=devices)[0]["train"]
        assert train["batch_size"] == 4096
        # DeepSpeed's identity: train_batch_size = micro x accumulation x world size.
        assert train["grad_accum"] * micro * world == 4096
    config, _ = translate(ds, devices=8)
    # Each of the 8 devices takes `micro` rows per micro-batch: the same activations as a batch of
    # 8 x micro rows without accumulation.
    per_step = dry_run_activations(tmp_path, config, capsys)
    reference = dry_run_activations(tmp_path, config, capsys, f"train.batch_size={8 * micro}", "train.grad_accum=1")
    assert per_step == reference


@pytest.mark.parametrize("ds,devices,match", [
    ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 4}, 8,
     "DeepSpeed refuses"),
    ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}, 3, "--devices"),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 16}, None, "is not a multiple"),
    ({"train_batch_size": 64}, 0, "--devices: got 0"),
])
def test_batch_keys_that_cannot_hold_are_refused(ds, devices, match):
    with pytest.raises(UserError, match=match):
        translate(ds, devices=devices)


def test_model_sizes_come_from_the_file_unless_a_model_is_named():
    config, notes = translate("data_efficiency_gpt.json")
    assert config["model"]["layers"] == 24 and config["data"]["seq_len"] == 2048 and config["model"]["max_len"] == 2048
    assert {"(model.layers)", "(data.seq_len)"} <= {key for key, _ in notes}
    assert translate("curriculum_seqlen_gpt2.json")[0]["data"]["seq_len"] == 1024
    with pytest.raises(UserError, match=r"total_layer_num' needs model.layers=24; --model=configs/quickstart.yaml"):
        translate("data_efficiency_gpt.json", model="configs/quickstart.yaml")
    with pytest.raises(UserError, match="model.layers=4 on the command line gives 4:"):
        translate("data_efficiency_gpt.json", "model.layers=4")
    config, _ = translate("data_efficiency_gpt.json", "model.layers=24", "data.seq_len=2048", "model.max_len=2048",
                          model="configs/quickstart.yaml")
    assert config["random_ltd"]["total_layer_num"] == 24


def test_compression_recipes_are_checked_against_the_model():
    config, notes = translate("compression_xtc_bert.json")
    keys = {key for key, _ in notes}
    assert config["compression"]["rules"] == {}  # BERT module names match nothing in a decoder
    assert {"compression_training.weight_quantization.different_groups.wq1.modules",
            "compression_training.activation_quantization.different_groups.aq1.modules",
            "compression_training.layer_reduction.module_name_prefix"} <= keys
    assert config["model"]["layers"] == 12  # teacher layer 11 exists
    with pytest.raises(UserError, match="teacher_layer' needs model.layers >= 12"):
        translate("compression_xtc_bert.json", model="configs/quickstart.yaml")
    config, notes = translate("compression_zeroquant_gpt2.json")
    rules = config["compression"]["rules"]
    assert set(rules) == {"weight_quantization_wq1", "weight_quantization_wq2", "activation_quantization_aq1"}
    assert rules["weight_quantization_wq1"]["weight_bits"] == 4
    assert rules["weight_quantization_wq1"]["weight_groups"] == 64
    assert any("start_bits 8 -> target_bits 4" in reason for key, reason in notes if key == "compression_training")


def test_bias_correction_tensorboard_and_pipeline():
    config, notes = translate("zero_one_adam_bert.json")
    assert config["optimizer"]["bias_correction"] is False
    assert "optimizer.params.bias_correction" not in {key for key, _ in notes}
    onebit = load("onebit_adam_bert.json")
    onebit["optimizer"]["params"]["bias_correction"] = True
    reasons = dict(translate(onebit)[1])
    assert "not applied by DeepSpeed" in reasons["optimizer.params.bias_correction"]
    adam = {"optimizer": {"type": "AdamW", "params": {"bias_correction": False}}}
    assert "not available" in dict(translate(adam)[1])["optimizer.params.bias_correction"]

    config, notes = translate("pipeline_parallelism.json")
    reasons = dict(notes)
    assert config["log"]["tensorboard"] is True and config["model"]["remat"] == "full"
    assert "mesh.stage" in reasons["pipeline"] and "mesh.stage" in reasons["pipeline.stages"]  # "auto": the model's
    assert "mesh" not in config or "stage" not in config["mesh"]
    staged, _ = translate({"pipeline": {"stages": 4, "partition": "uniform"}})
    assert staged["mesh"]["stage"] == 4
    assert "--workdir" in reasons["tensorboard.output_path"]
    assert config["train"]["grad_accum"] * 8 == 256  # 8-row micro-batches on one device
    assert translate({"tensorboard": {"enabled": False}})[0]["log"]["tensorboard"] is False


def test_encoder_random_ltd_recipe_applies_to_the_decoder():
    config, notes = translate("random_ltd_bert.json")
    assert config["random_ltd"]["enabled"] and config["random_ltd"]["random_ltd_layer_id"] == list(range(1, 23))
    assert "decoder" in dict(notes)["data_efficiency.data_routing.random_ltd.model_type"]
    with pytest.raises(UserError, match="model_type"):  # the sections-only command still refuses it
        deepspeed_data_efficiency.translate(load("random_ltd_bert.json"))


def test_data_efficiency_command_has_help(capsys):
    with pytest.raises(SystemExit) as stop:
        deepspeed_data_efficiency.main(["--help"])
    assert stop.value.code == 0 and "ds_config" in capsys.readouterr().out


def test_cli_takes_devices_and_overrides(capsys):
    path = str(CONFIGS / "onebit_adam_bert.json")
    assert deepspeed.main([path, "--devices=8", "train.steps=50", "optimizer.freeze_step=40"]) == 0
    out = capsys.readouterr()
    config = yaml.safe_load(out.out)
    assert config["train"]["grad_accum"] == 32 and config["train"]["steps"] == 50
    assert "not translated: (optimizer.freeze_step): 40 from the command line replaces 23000" in out.err
    with pytest.raises(SystemExit):
        deepspeed.main([path, "train.steps"])


def _documented_commands() -> list[list[str]]:
    text = (REPO / "docs" / "migrating_from_deepspeed.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, re.S)
    return [shlex.split(line.split("#")[0]) for block in blocks for line in block.splitlines()
            if line.startswith("python -m jaxllm.")]


@pytest.mark.parametrize("example", ["hf_trainer_zero3_auto.json", "onebit_adam_bert.json"])
def test_documented_commands_run_as_printed(tmp_path, monkeypatch, capsys, example):
    """The docs' commands, from a directory holding ds_config.json and the presets they name."""
    (tmp_path / "configs").mkdir()
    for preset in ("quickstart.yaml", "llama_small.yaml"):
        shutil.copy(REPO / "configs" / preset, tmp_path / "configs" / preset)
    shutil.copy(CONFIGS / example, tmp_path / "ds_config.json")
    monkeypatch.chdir(tmp_path)
    mains = {"jaxllm.interop.deepspeed": deepspeed.main, "jaxllm.train": train_lib.main}
    commands = _documented_commands()
    assert [c[2] for c in commands] == ["jaxllm.interop.deepspeed"] * 3 + ["jaxllm.train"]
    for words in commands:
        args, target = words[3:], None
        if ">" in args:
            args, target = args[:args.index(">")], args[args.index(">") + 1]
        with contextlib.ExitStack() as stack:
            if target:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(target, "w"))))
            assert mains[words[2]](args) == 0, capsys.readouterr().err
        if target:
            assert config_lib.from_dict(yaml.safe_load(Path(target).read_text()))
    assert "verdict:" in capsys.readouterr().out
