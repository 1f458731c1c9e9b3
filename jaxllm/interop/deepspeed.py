"""`python -m jaxllm.interop.deepspeed DS_CONFIG.json [--model=PRESET.yaml] > config.yaml`

Translates a DeepSpeed `ds_config.json` into a complete jaxllm YAML config. A ds_config says nothing
about the model or the data, so those sections (and `seed`) come from a preset (`--model`, default
configs/quickstart.yaml). Every DeepSpeed key that has no jaxllm equivalent, or only an approximate
one, is reported with the reason: in a comment block at the top of the YAML and on stderr. Keys are
never dropped silently, and sections this module does not know at all are a `UserError`, because a
typo there would otherwise change the run without a word.

The data-efficiency and compression sections reuse their own translators
(`jaxllm.interop.deepspeed_data_efficiency.translate`, `jaxllm.compression.rules.from_deepspeed`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxllm import config as config_lib
from jaxllm.compression import rules as rules_lib
from jaxllm.errors import UserError, exit_status
from jaxllm.interop import deepspeed_data_efficiency

DEFAULT_PRESET = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

# Top-level DeepSpeed sections that exist in DeepSpeed but have no jaxllm counterpart, with the reason.
# They are reported, not errors: the run is still well defined without them.
UNTRANSLATED_SECTIONS: dict[str, str] = {
    "wall_clock_breakdown": "jaxllm prints step time and MFU itself (jaxllm.metrics)",
    "memory_breakdown": "no per-step memory dump; see jaxllm.memory",
    "dump_state": "no engine state dump",
    "prescale_gradients": "XLA's reductions average gradients; no manual pre-scaling",
    "gradient_predivide_factor": "XLA's reductions average gradients; no manual pre-division",
    "communication_data_type": "XLA chooses collective dtypes from the parameter dtype",
    "sparse_gradients": "gradients are dense in jaxllm",
    "amp": "no NVIDIA Apex; use bf16",
    "zero_allow_untested_optimizer": "every jaxllm optimizer works with every ZeRO stage",
    "zero_force_ds_cpu_optimizer": "no CPU optimizer offload",
    "flops_profiler": "jaxllm reports FLOPs and MFU in its metrics",
    "tensorboard": "set log.tensorboard (on by default; writes to the workdir)",
    "wandb": "no Weights & Biases writer; metrics.jsonl holds the same numbers",
    "csv_monitor": "metrics.jsonl holds the same numbers",
    "comet": "no Comet writer; metrics.jsonl holds the same numbers",
    "comms_logger": "no communication logger",
    "aio": "no NVMe offload",
    "elasticity": "no elastic training",
    "autotuning": "no autotuner",
    "pipeline": "no pipeline parallelism; use mesh.fsdp / mesh.tensor",
    "checkpoint": "Orbax checkpoints: set checkpoint.every / checkpoint.keep",
    "sparse_attention": "no block-sparse attention",
    "eigenvalue": "no eigenvalue-based quantization schedule",
    "progressive_layer_drop": "no progressive layer drop; random-LTD is the supported token/layer dropping",
    "quantize_training": "MoQ is not supported; see compression_training",
    "nebula": "Orbax handles asynchronous checkpoints (checkpoint.async_save)",
    "hybrid_engine": "RLHF generation uses jaxllm.generate; see python -m jaxllm.rlhf",
    "data_types": "gradient accumulation runs in the parameter dtype",
    "seq_parallel_communication_data_type": "Ulysses collectives use the activation dtype",
    "compile": "everything is compiled by XLA under jax.jit",
    "timers": "jaxllm times steps itself",
    "gradient_accumulation_dtype": "gradient accumulation runs in the parameter dtype",
    "sequence_parallel_size": "set mesh.sequence (Ulysses sequence parallelism) to the same size",
    "tensor_parallel": "set mesh.tensor to the tensor-parallel size",
    "disable_allgather": "XLA schedules collectives itself",
    "moe": "no mixture-of-experts layers",
}

TRANSLATED_SECTIONS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "bfloat16", "fp16", "optimizer", "scheduler", "zero_optimization", "activation_checkpointing",
    "data_efficiency", "curriculum_learning", "compression_training", "steps_per_print",
}

OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "onebitadam": "onebit_adam", "zerooneadam": "zero_one_adam",
              "onebitlamb": "onebit_lamb"}
# Optimizer switches whose value, when equal to this, is what jaxllm's Optax optimizers do anyway.
SAME_AS_JAXLLM = {"bias_correction": True, "amsgrad": False, "torch_adam": False}
ONEBIT_ONLY = {
    "fused": "XLA fuses the update itself",
    "cuda_aware": "collectives are XLA's; there is no CUDA-aware MPI switch",
    "comm_backend_name": "collectives are XLA's (NCCL/ICI chosen by JAX)",
}


class Translation:
    """The jaxllm config being built and the report of what did not carry over."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.notes: list[tuple[str, str]] = []  # (DeepSpeed key, reason)

    def set(self, dotted: str, value: Any) -> None:
        section, key = dotted.split(".")
        self.config.setdefault(section, {})[key] = value

    def note(self, key: str, reason: str) -> None:
        self.notes.append((key, reason))


def _typed(value: Any, kind: type | tuple[type, ...], key: str, allowed: str) -> Any:
    """`value` when it is a `kind` (bools are never numbers here), else a UserError naming the key."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise UserError(f"DeepSpeed config '{key}': got {value!r}; expected {allowed}")
    return value


def _section(ds: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return _typed(ds[key], dict, key, "an object")


def _batch(ds: Mapping[str, Any], out: Translation) -> None:
    """DeepSpeed's global batch is micro * accumulation * GPUs; jaxllm's train.batch_size is the global
    batch and train.grad_accum splits it, so the GPU count drops out when train_batch_size is given."""
    sizes = {k: _typed(ds[k], int, k, "a positive integer") for k in
             ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps") if k in ds}
    for key, value in sizes.items():
        if value <= 0:
            raise UserError(f"DeepSpeed config '{key}': got {value}; expected a positive integer")
    accum = sizes.get("gradient_accumulation_steps", 1)
    if "train_batch_size" in sizes:
        batch = sizes["train_batch_size"]
        if "train_micro_batch_size_per_gpu" in sizes:
            out.note("train_micro_batch_size_per_gpu", "implied: train_batch_size / grad_accum is split over the "
                     "mesh's batch axes, so the per-device size follows from the device count")
    elif "train_micro_batch_size_per_gpu" in sizes:
        batch = sizes["train_micro_batch_size_per_gpu"] * accum
        out.note("train_micro_batch_size_per_gpu", f"approximate: no train_batch_size, so train.batch_size={batch} "
                 "assumes one GPU; multiply by your GPU count")
    else:
        return
    if batch % accum:
        raise UserError(f"DeepSpeed config 'train_batch_size': {batch} is not a multiple of "
                        f"gradient_accumulation_steps={accum}")
    out.set("train.batch_size", batch)
    out.set("train.grad_accum", accum)


def _precision(ds: Mapping[str, Any], out: Translation) -> None:
    for key in ("bf16", "bfloat16", "fp16"):
        if key not in ds:
            continue
        section = _section(ds, key)
        if not _typed(section.get("enabled", False), bool, f"{key}.enabled", "true or false"):
            continue
        out.set("model.compute_dtype", "bfloat16")
        if key == "fp16":
            out.note("fp16", "translated to bfloat16: it has fp32's exponent range, so no loss scaling is needed, "
                     "and TPUs and recent GPUs run it at fp16 speed")
        for sub in sorted(set(section) - {"enabled"}):
            out.note(f"{key}.{sub}", "no loss scaling or master-weight options: parameters stay float32 and "
                     "only the compute runs in bfloat16")


def _optimizer(ds: Mapping[str, Any], out: Translation) -> float | None:
    """The optimizer section; returns its learning rate (the scheduler may override it)."""
    section = _section(ds, "optimizer")
    kind = _typed(section.get("type"), str, "optimizer.type", "a string such as 'AdamW'")
    name = OPTIMIZERS.get(kind.lower().replace("_", ""))
    if name is None:
        raise UserError(f"DeepSpeed config 'optimizer.type': got {kind!r}; jaxllm supports "
                        "Adam, AdamW, OneBitAdam, ZeroOneAdam, OneBitLamb")
    params = _typed(section.get("params", {}), dict, "optimizer.params", "an object")
    out.set("optimizer.name", name)
    # DeepSpeed's (torch's) defaults, written out so jaxllm's own defaults (b2=0.95, weight_decay=0.1)
    # do not change the run.
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)):
        raise UserError(f"DeepSpeed config 'optimizer.params.betas': got {betas!r}; expected [beta1, beta2]")
    out.set("optimizer.b1", float(betas[0]))
    out.set("optimizer.b2", float(betas[1]))
    out.set("optimizer.eps", float(_typed(params.get("eps", 1e-8), (int, float), "optimizer.params.eps", "a number")))
    decay = float(_typed(params.get("weight_decay", 0.0), (int, float), "optimizer.params.weight_decay", "a number"))
    out.set("optimizer.weight_decay", decay)
    if kind.lower() == "adam" and not params.get("adam_w_mode", True) and decay:
        out.note("optimizer.params.adam_w_mode", "approximate: jaxllm always decouples weight decay (AdamW); "
                 "false (L2 penalty in the gradient) is not available")
    allowed = config_lib.ONEBIT_PARAMS[name]
    for key in sorted(set(params) - {"lr", "betas", "eps", "weight_decay"}):
        path = f"optimizer.params.{key}"
        if key in allowed:
            out.set(f"optimizer.{key}", _typed(params[key], (int, float), path, "a number"))
        elif key in ONEBIT_ONLY:
            out.note(path, ONEBIT_ONLY[key])
        elif key == "adam_w_mode":
            continue  # handled above
        elif key in SAME_AS_JAXLLM and params[key] == SAME_AS_JAXLLM[key]:
            continue  # the value describes what jaxllm does anyway
        elif key in SAME_AS_JAXLLM:
            out.note(path, f"{params[key]!r} is not available: jaxllm's optimizers run with {SAME_AS_JAXLLM[key]!r}")
        else:
            takes = ", ".join((*allowed, "lr", "betas", "eps", "weight_decay"))
            out.note(path, f"not a parameter of jaxllm's {name} (it takes {takes})")
    if "lr" in params:
        return float(_typed(params["lr"], (int, float), "optimizer.params.lr", "a number"))
    return None


def _scheduler(ds: Mapping[str, Any], out: Translation, lr: float | None) -> float | None:
    """DeepSpeed schedules onto jaxllm's one schedule: linear warm-up from 0 to train.lr, then cosine decay
    to train.lr * train.min_lr_ratio at train.steps. Returns the peak learning rate."""
    section = _section(ds, "scheduler")
    kind = _typed(section.get("type"), str, "scheduler.type", "a string such as 'WarmupLR'")
    params = _typed(section.get("params", {}), dict, "scheduler.params", "an object")

    def num(key: str, default: Any) -> Any:
        return _typed(params.get(key, default), (int, float), f"scheduler.params.{key}", "a number")

    if kind not in SCHEDULER_PARAMS:
        out.note("scheduler", f"{kind} has no jaxllm equivalent; the run uses warm-up + cosine decay "
                 "(train.warmup_steps, train.min_lr_ratio)")
        return lr
    for key in sorted(set(params) - SCHEDULER_PARAMS[kind]):
        reason = ("jaxllm's schedules are pure functions of the step; resuming restores the step from the "
                  "checkpoint" if key == "last_batch_iteration" else f"not a parameter of {kind}")
        out.note(f"scheduler.params.{key}", reason)
    out.set("train.warmup_steps", int(num("warmup_num_steps", 1000)))
    if params.get("warmup_type", "log") != "linear":
        out.note("scheduler.params.warmup_type", "approximate: DeepSpeed's default warm-up is logarithmic; "
                 "jaxllm warms up linearly")
    if kind == "WarmupCosineLR":
        if num("warmup_min_ratio", 0.0):
            out.note("scheduler.params.warmup_min_ratio", "approximate: jaxllm's warm-up starts at 0")
        out.set("train.min_lr_ratio", float(num("cos_min_ratio", 0.0001)))
        out.set("train.steps", int(num("total_num_steps", 0)) or _missing("total_num_steps"))
        return lr
    if num("warmup_min_lr", 0.0):
        out.note("scheduler.params.warmup_min_lr", "approximate: jaxllm's warm-up starts at 0")
    peak = float(num("warmup_max_lr", 0.001))
    if kind == "WarmupLR":
        out.set("train.min_lr_ratio", 1.0)  # cosine from the peak to the peak: constant after warm-up
    else:
        out.set("train.min_lr_ratio", 0.0)
        out.set("train.steps", int(num("total_num_steps", 0)) or _missing("total_num_steps"))
        out.note("scheduler.type", "approximate: WarmupDecayLR decays linearly to 0; jaxllm decays along a "
                 "cosine to 0 over the same steps")
    if lr is not None and lr != peak:
        out.note("optimizer.params.lr", f"overridden by scheduler.params.warmup_max_lr={peak}, as in DeepSpeed")
    return peak


_WARMUP = {"warmup_num_steps", "warmup_type"}
SCHEDULER_PARAMS = {"WarmupLR": _WARMUP | {"warmup_min_lr", "warmup_max_lr"},
                    "WarmupDecayLR": _WARMUP | {"warmup_min_lr", "warmup_max_lr", "total_num_steps"},
                    "WarmupCosineLR": _WARMUP | {"warmup_min_ratio", "cos_min_ratio", "total_num_steps"}}


def _missing(key: str) -> int:
    raise UserError(f"DeepSpeed config 'scheduler.params.{key}': required (a positive integer) for this schedule")


def _zero(ds: Mapping[str, Any], out: Translation) -> None:
    """ZeRO stages are shardings over the mesh's fsdp axis (jaxllm.mesh); all devices go to that axis, as
    DeepSpeed partitions over the whole data-parallel group."""
    if isinstance(ds["zero_optimization"], bool):  # DeepSpeed's old form: true means stage 1
        out.note("zero_optimization", f"boolean form read as stage {int(ds['zero_optimization'])}")
        ds = {"zero_optimization": {"stage": int(ds["zero_optimization"])}}
    section = _section(ds, "zero_optimization")
    stage = _typed(section.get("stage", 0), int, "zero_optimization.stage", "0, 1, 2 or 3")
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config 'zero_optimization.stage': got {stage}; expected 0, 1, 2 or 3")
    out.set("mesh.zero_stage", stage)
    out.set("mesh.fsdp", -1 if stage else 1)
    out.set("mesh.data", 1 if stage else -1)
    for key in sorted(set(section) - {"stage"}):
        reason = ("no CPU/NVMe offload: memory comes from sharding over more devices" if "offload" in key
                  else "XLA schedules and buckets collectives itself")
        out.note(f"zero_optimization.{key}", reason)


def _activation_checkpointing(ds: Mapping[str, Any], out: Translation) -> None:
    """DeepSpeed checkpoints what the model code wraps (usually every layer); jaxllm's `full` remat does
    the same for every block."""
    section = _section(ds, "activation_checkpointing")
    out.set("model.remat", "full")
    reasons = {"partition_activations": "activations are sharded by the mesh already",
               "cpu_checkpointing": "no CPU offload of checkpoints"}
    for key in sorted(section):
        out.note(f"activation_checkpointing.{key}", reasons.get(key, "XLA decides memory layout and synchronisation"))


def _compression(ds: Mapping[str, Any], out: Translation) -> None:
    """Compression rules as explicit `compression.rules`, so the YAML does not depend on the JSON file."""
    recipe = rules_lib.from_deepspeed({"compression_training": ds["compression_training"]})
    rules = {}
    for i, rule in enumerate(recipe.rules):
        rules[f"ds_{i}"] = {"modules": list(rule.modules), "weight_bits": rule.weight_bits,
                            "weight_groups": rule.weight_groups, "weight_symmetric": rule.weight_symmetric,
                            "act_bits": rule.act_bits, "act_symmetric": rule.act_symmetric,
                            "act_range": "static" if rule.act_static else "dynamic"}
    section: dict[str, Any] = {"rules": rules}
    if recipe.teacher_layers:
        section["layer_reduction"] = {"enabled": True, "teacher_layer": list(recipe.teacher_layers)}
    out.config["compression"] = section
    out.note("compression_training", "applied by `python -m jaxllm.compress` (PTQ/LKD/XTC), not during "
             "`python -m jaxllm.train`")


def translate(ds: Any, preset: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A jaxllm config (as a dict) and the (DeepSpeed key, reason) list of what was not translated exactly.

    `preset` supplies `seed`, `model` and `data`; DeepSpeed's sections overwrite keys inside them
    (e.g. `model.compute_dtype`).
    """
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config: got {type(ds).__name__}; expected a JSON object")
    unknown = sorted(set(ds) - TRANSLATED_SECTIONS - set(UNTRANSLATED_SECTIONS))
    if unknown:
        raise UserError(f"DeepSpeed config '{unknown[0]}': unknown top-level section; jaxllm knows "
                        f"{', '.join(sorted(TRANSLATED_SECTIONS | set(UNTRANSLATED_SECTIONS)))}")
    out = Translation()
    for key in ("seed", "model", "data"):
        if preset and key in preset:
            out.config[key] = json.loads(json.dumps(preset[key]))  # a deep copy
    _batch(ds, out)
    clip = _typed(ds.get("gradient_clipping", 0.0), (int, float), "gradient_clipping", "a number >= 0")
    out.set("optimizer.grad_clip", float(clip))  # 0 (no clipping) unless asked, as in DeepSpeed
    if "steps_per_print" in ds:
        out.set("train.log_every", _typed(ds["steps_per_print"], int, "steps_per_print", "a positive integer"))
    _precision(ds, out)
    lr = _optimizer(ds, out) if "optimizer" in ds else None
    if "scheduler" in ds:
        lr = _scheduler(ds, out, lr)
    if lr is not None:
        out.set("train.lr", lr)
    if "zero_optimization" in ds:
        _zero(ds, out)
    if config_lib.ONEBIT_PARAMS.get(out.config.get("optimizer", {}).get("name", "adamw")) and \
            out.config.get("mesh", {}).get("fsdp") == -1:
        # The 1-bit optimizers compress the gradient average over mesh.data; DeepSpeed's 1-bit
        # optimizers do not combine with ZeRO partitioning either.
        out.set("mesh.fsdp", 1)
        out.set("mesh.data", -1)
        out.note("zero_optimization.stage", "not applied: 1-bit/0-1 optimizers compress the gradient average over "
                 "mesh.data, so parameters and optimizer state stay replicated")
    if "activation_checkpointing" in ds:
        _activation_checkpointing(ds, out)
    efficiency = deepspeed_data_efficiency.translate(
        {k: ds[k] for k in ("data_efficiency", "curriculum_learning") if k in ds})
    out.config.update(efficiency)
    if "compression_training" in ds:
        _compression(ds, out)
    for key in sorted(set(ds) & set(UNTRANSLATED_SECTIONS)):
        out.note(key, UNTRANSLATED_SECTIONS[key])
    if "steps" not in out.config.get("train", {}):
        out.note("(training length)", "a ds_config has no step count unless a scheduler gives total_num_steps; "
                 f"train.steps keeps jaxllm's default ({config_lib.TrainConfig.steps}): set it")
    config_lib.from_dict(out.config)  # the result must be a valid jaxllm config
    return out.config, out.notes


def read(path: str | Path) -> Any:
    """The parsed JSON of `path`; invalid JSON names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config file '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config file '{path}' line {err.lineno} column {err.colno}: invalid JSON "
                        f"({err.msg})") from None


def render(config: Mapping[str, Any], notes: list[tuple[str, str]], source: str) -> str:
    """YAML text with the untranslated keys in a comment block at the top."""
    lines = [f"# Translated from DeepSpeed config {source} by python -m jaxllm.interop.deepspeed"]
    if notes:
        lines.append("# Not translated exactly (DeepSpeed key: reason):")
        lines += [f"#   {key}: {reason}" for key, reason in notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(dict(config), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.interop.deepspeed",
                                     description="Translate a DeepSpeed ds_config.json into a jaxllm YAML config.")
    parser.add_argument("ds_config", help="DeepSpeed JSON config")
    parser.add_argument("--model", default=str(DEFAULT_PRESET),
                        help="jaxllm YAML whose seed/model/data sections the output uses (default: quickstart)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        config, notes = translate(read(args.ds_config), config_lib.read_yaml(args.model))
        for key, reason in notes:
            print(f"not translated: {key}: {reason}", file=sys.stderr)
        print(render(config, notes, args.ds_config), end="")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
