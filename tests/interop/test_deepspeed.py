"""DeepSpeed ds_config -> jaxllm YAML (jaxllm.interop.deepspeed) on configs from DeepSpeed's documentation."""

import json
import subprocess
import sys

import pytest
import yaml

from jaxllm import config as config_lib
from jaxllm import train as train_lib
from jaxllm.errors import UserError
from jaxllm.interop import deepspeed

FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}

# The JSON examples of DeepSpeed's docs (config-json page, tutorials), written out as Python dicts.
CONFIG_JSON_PAGE = {"train_batch_size": 8, "gradient_accumulation_steps": 1,
                    "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
                    "fp16": {"enabled": True}, "zero_optimization": True}
ONEBIT_ADAM = {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16,
               "optimizer": {"type": "OneBitAdam", "params": {"lr": 4e-4, "freeze_step": 23000, "cuda_aware": False,
                                                              "comm_backend_name": "nccl"}},
               "gradient_clipping": 1.0, "fp16": FP16}
ZERO_ONE_ADAM = {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 32,
                 "optimizer": {"type": "ZeroOneAdam", "params": {
                     "lr": 1e-3, "weight_decay": 0.01, "bias_correction": False, "var_freeze_step": 1000,
                     "var_update_scaler": 16, "local_step_scaler": 1000, "local_step_clipper": 16,
                     "cuda_aware": False, "comm_backend_name": "nccl"}},
                 "gradient_clipping": 1.0, "fp16": FP16}
ONEBIT_LAMB = {"train_batch_size": 65536, "train_micro_batch_size_per_gpu": 64,
               "optimizer": {"type": "OneBitLamb", "params": {
                   "lr": 11e-3, "weight_decay": 0.01, "bias_correction": False, "max_coeff": 0.3, "min_coeff": 0.01,
                   "freeze_step": 1000, "cuda_aware": False, "comm_backend_name": "nccl", "coeff_beta": 0.9,
                   "factor_max": 4.0, "factor_min": 0.5, "factor_threshold": 0.1}},
               "gradient_clipping": 1.0, "fp16": FP16}
ZERO3_OFFLOAD = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                 "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1}},
                 "scheduler": {"type": "WarmupDecayLR", "params": {
                     "last_batch_iteration": -1, "total_num_steps": 1000, "warmup_min_lr": 0,
                     "warmup_max_lr": 3e-5, "warmup_num_steps": 100}},
                 "zero_optimization": {"stage": 3, "contiguous_gradients": True, "overlap_comm": True,
                                       "stage3_max_live_parameters": 1e9, "reduce_bucket_size": 1e7,
                                       "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
                 "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": False,
                                              "contiguous_memory_optimization": False, "number_checkpoints": None},
                 "wall_clock_breakdown": False}
WARMUP_COSINE = {"train_batch_size": 16, "steps_per_print": 5,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                 "scheduler": {"type": "WarmupCosineLR", "params": {
                     "total_num_steps": 500, "warmup_num_steps": 50, "warmup_type": "linear", "cos_min_ratio": 0.1}},
                 "zero_optimization": {"stage": 2, "allgather_partitions": True, "reduce_scatter": True}}
DATA_EFFICIENCY = {"train_batch_size": 16, "data_efficiency": {
    "enabled": True, "seed": 1234,
    "data_routing": {"enabled": True, "random_ltd": {
        "enabled": True, "model_type": "decoder", "random_ltd_layer_id": [1, 2],
        "random_ltd_schedule": {"min_value": 64, "max_value": 128, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 50, "seq_per_step": 16}}}}}}
COMPRESSION = {"train_batch_size": 16, "compression_training": {"weight_quantization": {
    "shared_parameters": {"enabled": True, "quantizer_kernel": False, "schedule_offset": 0, "quantize_groups": 1,
                          "quantize_verbose": False, "quantization_type": "symmetric", "rounding": "nearest",
                          "quantize_weight_in_forward": False,
                          "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001}},
    "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8, "quantization_period": 50},
                                 "modules": ["attn", "mlp"]}}}}}


def _translate(ds):
    return deepspeed.translate(ds, config_lib.read_yaml(deepspeed.DEFAULT_PRESET))


def _keys(notes):
    return {key for key, _ in notes}


def _dry_run(tmp_path, ds, name="ds"):
    """The CLI's YAML for `ds` goes through `python -m jaxllm.train --dry-run` (in process)."""
    src = tmp_path / f"{name}.json"
    src.write_text(json.dumps(ds))
    out = tmp_path / f"{name}.yaml"
    text = subprocess.run([sys.executable, "-m", "jaxllm.interop.deepspeed", str(src)], check=True,
                          capture_output=True, text=True).stdout if name == "cli" else None
    if text is None:
        config, notes = _translate(ds)
        text = deepspeed.render(config, notes, str(src))
    out.write_text(text)
    assert train_lib.main([f"--config={out}", f"--workdir={tmp_path / 'w'}", "--dry-run"]) == 0
    return text


def test_config_json_page_example():
    config, notes = _translate(CONFIG_JSON_PAGE)
    assert config["train"] == {"batch_size": 8, "grad_accum": 1, "lr": 0.00015}
    assert config["optimizer"]["name"] == "adamw" and config["optimizer"]["b2"] == 0.999
    assert config["optimizer"]["weight_decay"] == 0.0 and config["optimizer"]["grad_clip"] == 0.0
    assert config["model"]["compute_dtype"] == "bfloat16"
    assert config["mesh"] == {"zero_stage": 1, "fsdp": -1, "data": 1}
    assert {"fp16", "zero_optimization"} <= _keys(notes)


@pytest.mark.parametrize("ds,name,params", [
    (ONEBIT_ADAM, "onebit_adam", {"freeze_step": 23000}),
    (ZERO_ONE_ADAM, "zero_one_adam", {"var_freeze_step": 1000, "var_update_scaler": 16, "local_step_scaler": 1000,
                                      "local_step_clipper": 16}),
    (ONEBIT_LAMB, "onebit_lamb", {"freeze_step": 1000, "max_coeff": 0.3, "min_coeff": 0.01, "coeff_beta": 0.9,
                                  "factor_max": 4.0, "factor_min": 0.5, "factor_threshold": 0.1}),
])
def test_compressed_optimizer_tutorials(tmp_path, ds, name, params):
    _dry_run(tmp_path, ds)
    config, notes = _translate(ds)
    opt = config["optimizer"]
    assert opt["name"] == name and opt["grad_clip"] == 1.0
    assert {k: opt[k] for k in params} == params
    assert config["train"]["batch_size"] == ds["train_batch_size"]
    keys = _keys(notes)
    assert {"optimizer.params.cuda_aware", "optimizer.params.comm_backend_name", "fp16", "fp16.loss_scale",
            "train_micro_batch_size_per_gpu", "(training length)"} <= keys
    if "bias_correction" in ds["optimizer"]["params"]:  # false: what DeepSpeed's 1-bit updates do anyway
        assert "optimizer.params.bias_correction" not in keys
        assert opt.get("bias_correction", False) is False


def test_zero3_offload_warmup_decay_and_checkpointing(tmp_path):
    config, notes = _translate(ZERO3_OFFLOAD)
    assert config["train"]["batch_size"] == 16 and config["train"]["grad_accum"] == 2
    assert config["train"]["steps"] == 1000 and config["train"]["warmup_steps"] == 100
    assert config["train"]["lr"] == 3e-5 and config["train"]["min_lr_ratio"] == 0.0
    assert config["optimizer"]["b2"] == 0.95 and config["optimizer"]["weight_decay"] == 0.1
    assert config["mesh"]["zero_stage"] == 3 and config["model"]["remat"] == "full"
    # ZeRO-Offload: the optimizer state, and in mixed precision the fp32 master weights, on the CPU.
    assert config["mesh"]["offload"] == "optimizer_and_params"  # bf16 here
    keys = _keys(notes)
    assert {"zero_optimization.offload_optimizer", "zero_optimization.offload_param", "zero_optimization.overlap_comm",
            "scheduler.params.last_batch_iteration", "scheduler.type", "scheduler.params.warmup_type",
            "activation_checkpointing.partition_activations", "wall_clock_breakdown",
            "train_micro_batch_size_per_gpu"} <= keys
    text = _dry_run(tmp_path, ZERO3_OFFLOAD)
    assert text.startswith("# Translated from DeepSpeed config")
    assert "#   zero_optimization.offload_param: no NVMe offload, nor of parameters" in text


def test_warmup_cosine_is_exact(tmp_path):
    config, notes = _translate(WARMUP_COSINE)
    assert config["train"] == {"batch_size": 16, "grad_accum": 1, "log_every": 5, "warmup_steps": 50,
                               "min_lr_ratio": 0.1, "steps": 500, "lr": 1e-3}
    assert not any(key.startswith("scheduler") for key in _keys(notes))
    _dry_run(tmp_path, WARMUP_COSINE, name="cli")


def test_data_efficiency_and_compression(tmp_path):
    config, _ = _translate(DATA_EFFICIENCY)
    assert config["random_ltd"]["enabled"] is True
    assert config["random_ltd"]["random_ltd_layer_id"] == [1, 2]
    _dry_run(tmp_path, DATA_EFFICIENCY)
    config, notes = _translate(COMPRESSION)
    (rule,) = config["compression"]["rules"].values()
    assert rule["weight_bits"] == 8 and rule["weight_symmetric"] is True
    assert "compression_training" in _keys(notes)


def test_onebit_with_zero_keeps_the_data_axis(tmp_path):
    config, notes = _translate({**ONEBIT_ADAM, "zero_optimization": {"stage": 2}})
    assert config["mesh"]["fsdp"] == 1 and config["mesh"]["data"] == -1
    assert "zero_optimization.stage" in _keys(notes)


@pytest.mark.parametrize("ds,match", [
    ({"train_batch_size": "8"}, "'train_batch_size': got '8'"),
    ({"optimizer": {"type": "SGD"}}, "'optimizer.type': got 'SGD'"),
    ({"zero_optimization": {"stage": 4}}, "'zero_optimization.stage': got 4"),
    ({"bf16": {"enabled": "yes"}}, "'bf16.enabled'"),
    ({"train_batch_sizes": 8}, "'train_batch_sizes': unknown top-level section"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {}}}, "total_num_steps"),
])
def test_bad_input_is_a_user_error(ds, match):
    with pytest.raises(UserError, match=match):
        _translate(ds)


def test_cli_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "ds_config.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    result = subprocess.run([sys.executable, "-m", "jaxllm.interop.deepspeed", str(bad)], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert f"'{bad}' line 3" in result.stderr and result.stdout == ""


def test_render_lists_notes_and_is_yaml():
    config, notes = _translate(ONEBIT_ADAM)
    text = deepspeed.render(config, notes, "ds.json")
    assert "#   optimizer.params.cuda_aware:" in text
    assert yaml.safe_load(text) == config
