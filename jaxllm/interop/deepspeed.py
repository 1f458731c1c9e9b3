"""`python -m jaxllm.interop.deepspeed DS_CONFIG.json [--model=YAML] [--devices=N] [key=value ...] > config.yaml`

Translates a DeepSpeed `ds_config.json` into a complete jaxllm YAML config. A ds_config says nothing
about the model or the data, so those sections (and `seed`) come from a preset (`--model`, default
configs/quickstart.yaml); without `--model`, the sizes the file implies (random-LTD's layer count, a
curriculum's sequence length) replace the default model's (`jaxllm.interop.deepspeed_model`).
`section.key=value` overrides are the run's options, as for `python -m jaxllm.train`: they fill
DeepSpeed's `"auto"` values (the Hugging Face Trainer's placeholders) and win over the file. `--devices`
gives the data-parallel size that turns a micro-batch into `train.grad_accum`
(`jaxllm.interop.deepspeed_batch`).

Every DeepSpeed key that has no jaxllm equivalent, or only an approximate one, is reported with the
reason: in a comment block at the top of the YAML and on stderr. Keys are never dropped silently, and
sections this module does not know at all are a `UserError`, because a typo there would otherwise
change the run without a word.

The data-efficiency and compression sections reuse their own translators
(`jaxllm.interop.deepspeed_data_efficiency.translate`, `jaxllm.compression.rules.from_deepspeed`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxllm import config as config_lib
from jaxllm.compression import rules as rules_lib
from jaxllm.errors import UserError, exit_status
from jaxllm.interop import deepspeed_batch, deepspeed_data_efficiency, deepspeed_model, deepspeed_optimizer
from jaxllm.interop.deepspeed_translation import AUTO, Translation, mapping, typed

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
    "wandb": "no Weights & Biases writer; metrics.jsonl holds the same numbers",
    "csv_monitor": "metrics.jsonl holds the same numbers",
    "comet": "no Comet writer; metrics.jsonl holds the same numbers",
    "comms_logger": "no communication logger",
    "aio": "no NVMe offload",
    "elasticity": "no elastic training",
    "autotuning": "no autotuner",
    "checkpoint": "Orbax checkpoints: set checkpoint.every / checkpoint.keep",
    "sparse_attention": "no block-sparse attention",
    "eigenvalue": "no eigenvalue-based quantization schedule",
    "progressive_layer_drop": "no progressive layer drop; random-LTD is the supported token/layer dropping",
    "quantize_training": "MoQ is not supported; see compression_training",
    "nebula": "Orbax handles asynchronous checkpoints (checkpoint.async_save)",
    "hybrid_engine": "RLHF generation uses jaxllm.generate; see python -m jaxllm.rlhf",
    "data_types": "gradient accumulation runs in the parameter dtype",
    "seq_parallel_communication_data_type": "Ulysses collectives use the activation dtype",
    "seq_parallel_comm_data_type": "Ulysses collectives use the activation dtype",
    "compile": "everything is compiled by XLA under jax.jit",
    "timers": "jaxllm times steps itself",
    "gradient_accumulation_dtype": "gradient accumulation runs in the parameter dtype",
    "sequence_parallel_size": "set mesh.sequence (Ulysses sequence parallelism) to the same size",
    "tensor_parallel": "set mesh.tensor to the tensor-parallel size",
    "disable_allgather": "XLA schedules collectives itself",
    "moe": "no mixture-of-experts layers",
    "graph_harvesting": "XLA compiles the whole step; there are no kernel graphs to capture",
    "dataloader_drop_last": "jaxllm's data pipeline only yields whole batches",
    "vocabulary_size": "the vocabulary is model.vocab_size",
    "use_data_before_expert_parallelism": "no expert parallelism",
    "dynamic_train": "an early random-LTD format that current DeepSpeed ignores; write "
                     "data_efficiency.data_routing.random_ltd to use random-LTD",
}

TRANSLATED_SECTIONS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "bfloat16", "fp16", "optimizer", "scheduler", "zero_optimization", "activation_checkpointing",
    "data_efficiency", "curriculum_learning", "compression_training", "steps_per_print", "tensorboard", "pipeline",
}

ZERO_REASONS = {
    "stage3_gather_16bit_weights_on_model_save": "Orbax saves the sharded state; python -m "
                                                 "jaxllm.interop.convert to-hf writes whole (bfloat16) weights",
    "elastic_checkpoint": "Orbax checkpoints restore onto any mesh",
}
# The pipeline section's keys. DeepSpeed runs all gradient_accumulation_steps micro-batches through one
# 1F1B schedule, which bounds activation memory by the stage count; jaxllm's GPipe keeps every pipeline
# micro-batch's activations for the backward pass, so its train.grad_accum loop is what bounds them.
PIPELINE = ("jaxllm's pipeline is mesh.stage (GPipe or circular schedule, docs/pipeline.md); DeepSpeed's 1F1B "
            "schedule has GPipe's bubble; its gradient_accumulation_steps micro-batches are jaxllm's "
            "train.grad_accum loss calls times mesh.pipeline_microbatches each (the memory of one loss call's "
            "pipeline against the bubble); the stage count is the model's (PipelineModule num_stages) unless "
            "pipeline.stages gives it")


def _precision(ds: Mapping[str, Any], out: Translation) -> None:
    for key in ("bf16", "bfloat16", "fp16"):
        if key not in ds:
            continue
        section = mapping(ds, key)
        enabled = section.get("enabled", False)
        if enabled == AUTO:
            out.auto(f"{key}.enabled", "model.compute_dtype")
        elif not typed(enabled, bool, f"{key}.enabled", "true, false or \"auto\""):
            continue
        else:
            out.set("model.compute_dtype", "bfloat16")
        if key == "fp16" and enabled is True:
            out.note("fp16", "translated to bfloat16: it has fp32's exponent range, so no loss scaling is needed, "
                     "and TPUs and recent GPUs run it at fp16 speed")
        for sub in sorted(set(section) - {"enabled"}):
            out.note(f"{key}.{sub}", "no loss scaling or master-weight options: parameters stay float32 and "
                     "only the compute runs in bfloat16")


def _zero(ds: Mapping[str, Any], out: Translation) -> None:
    """ZeRO stages are shardings over the mesh's fsdp axis (jaxllm.mesh); all devices go to that axis, as
    DeepSpeed partitions over the whole data-parallel group."""
    if isinstance(ds["zero_optimization"], bool):  # DeepSpeed's old form: true means stage 1
        out.note("zero_optimization", f"boolean form read as stage {int(ds['zero_optimization'])}")
        ds = {"zero_optimization": {"stage": int(ds["zero_optimization"])}}
    section = mapping(ds, "zero_optimization")
    stage = typed(section.get("stage", 0), int, "zero_optimization.stage", "0, 1, 2 or 3")
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config 'zero_optimization.stage': got {stage}; expected 0, 1, 2 or 3")
    out.set("mesh.zero_stage", stage)
    out.set("mesh.fsdp", -1 if stage else 1)
    out.set("mesh.data", 1 if stage else -1)
    offload = section.get("offload_optimizer")
    if isinstance(offload, Mapping) and offload.get("device") == "cpu":
        # ZeRO-Offload keeps the optimizer state, and in mixed precision the fp32 master weights with it,
        # in host memory; the devices compute with the 16-bit copy.
        mixed = out.config.get("model", {}).get("compute_dtype") == "bfloat16"
        out.set("mesh.offload", "optimizer_and_params" if mixed else "optimizer")
    for key in sorted(set(section) - {"stage"}):
        if key == "offload_optimizer" and "offload" in out.config.get("mesh", {}):
            chosen = out.config["mesh"]["offload"]
            out.note("zero_optimization.offload_optimizer", f"the device 'cpu' gives mesh.offload: {chosen} "
                     "(in host memory, updated on the devices); pin_memory and the rest have no counterpart")
            continue
        reason = ("no NVMe offload, nor of parameters: memory comes from sharding over more devices" if "offload" in key
                  else ZERO_REASONS.get(key, "XLA schedules and buckets collectives itself"))
        if section[key] == AUTO:
            reason = f"auto (the Hugging Face Trainer sizes it from the model): {reason}"
        out.note(f"zero_optimization.{key}", reason)


def _activation_checkpointing(ds: Mapping[str, Any], out: Translation) -> None:
    """DeepSpeed checkpoints what the model code wraps (usually every layer); jaxllm's `full` remat does
    the same for every block."""
    section = mapping(ds, "activation_checkpointing")
    out.set("model.remat", "full")
    reasons = {"partition_activations": "activations are sharded by the mesh already",
               "cpu_checkpointing": "no CPU offload of checkpoints"}
    for key in sorted(section):
        out.note(f"activation_checkpointing.{key}", reasons.get(key, "XLA decides memory layout and synchronisation"))


def _tensorboard(ds: Mapping[str, Any], out: Translation) -> None:
    section = mapping(ds, "tensorboard")
    out.set("log.tensorboard", typed(section.get("enabled", False), bool, "tensorboard.enabled", "true or false"))
    for key in sorted(set(section) - {"enabled"}):
        out.note(f"tensorboard.{key}", "jaxllm writes TensorBoard events into the run's --workdir")


def _pipeline(ds: Mapping[str, Any], out: Translation) -> None:
    """A stage count goes to `mesh.stage`; activation checkpointing between stages' layers is jaxllm's
    per-block remat; DeepSpeed's partitioning options have no counterpart (jaxllm gives every stage the
    same number of block slots, padding the last layer groups when the layers do not divide)."""
    section = mapping(ds, "pipeline")
    stages = section.get("stages")
    if isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1:
        out.set("mesh.stage", stages)
    interval = section.get("activation_checkpoint_interval", 0)
    if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
        out.set("model.remat", "full")
        if interval > 1:
            out.note("pipeline.activation_checkpoint_interval", f"approximate: {interval} layers per checkpoint; "
                     "jaxllm's model.remat: full checkpoints every block")
    out.note("pipeline", PIPELINE)
    for key in sorted(set(section) - {"activation_checkpoint_interval"}):
        if key == "stages" and "stage" in out.config.get("mesh", {}):
            continue
        out.note(f"pipeline.{key}", "the stage count comes from the model's PipelineModule; give mesh.stage"
                 if key == "stages" else "jaxllm gives every layer group (mesh.stage x mesh.pipeline_repeats of "
                 "them) the same number of block slots, padding the last groups with skipped blocks when the "
                 "layers do not divide; no counterpart")


def _data_efficiency(ds: Mapping[str, Any], out: Translation) -> None:
    """`curriculum:` and `random_ltd:`; a random-LTD recipe written for an encoder (BERT) applies to the
    decoder, whose layers and schedule it names the same way."""
    sections = {k: ds[k] for k in ("data_efficiency", "curriculum_learning") if k in ds}
    routing = ((sections.get("data_efficiency") or {}).get("data_routing") or {}) \
        if isinstance(sections.get("data_efficiency"), dict) else {}
    ltd = routing.get("random_ltd") if isinstance(routing, dict) else None
    if isinstance(ltd, dict) and ltd.get("model_type") == "encoder":
        sections = json.loads(json.dumps(sections))  # a deep copy to change
        sections["data_efficiency"]["data_routing"]["random_ltd"]["model_type"] = "decoder"
        out.note("data_efficiency.data_routing.random_ltd.model_type", "'encoder': jaxllm's models are decoders; "
                 "the layer ids and schedule apply to the decoder's blocks (causal attention)")
    out.config.update(deepspeed_data_efficiency.translate(sections, out.note))


def _compression(ds: Mapping[str, Any], out: Translation) -> None:
    """Compression rules as explicit `compression.rules`, so the YAML does not depend on the JSON file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = rules_lib.from_deepspeed({"compression_training": ds["compression_training"]})
    for warning in caught:
        out.note("compression_training", f"approximate: {warning.message}")
    rules = {}
    for rule in recipe.rules:
        kind, group = rule.name.split(".")
        name = f"{kind}_{group}"
        out.rule_sources[name] = f"compression_training.{kind}.different_groups.{group}.modules"
        rules[name] = {"modules": list(rule.modules), "weight_bits": rule.weight_bits,
                       "weight_groups": rule.weight_groups, "weight_symmetric": rule.weight_symmetric,
                       "act_bits": rule.act_bits, "act_symmetric": rule.act_symmetric,
                       "act_range": "static" if rule.act_static else "dynamic"}
    section: dict[str, Any] = {"rules": rules}
    if recipe.teacher_layers:
        section["layer_reduction"] = {"enabled": True, "teacher_layer": list(recipe.teacher_layers)}
        reduction = ds["compression_training"]["layer_reduction"]
        for key in sorted(set(reduction) & {"module_name_prefix", "other_module_name"}):
            out.note(f"compression_training.layer_reduction.{key}", "jaxllm reduces the decoder's blocks and copies "
                     "its embeddings, norms and head; module names are not needed")
    out.config["compression"] = section
    out.note("compression_training", "applied by `python -m jaxllm.compress` (PTQ/LKD/XTC), not during "
             "`python -m jaxllm.train`")


def translate(ds: Any, preset: Mapping[str, Any] | None = None, overrides: list[str] | None = None,
              devices: int | None = None, model_source: str | None = None
              ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A jaxllm config (as a dict) and the (DeepSpeed key, reason) list of what was not translated exactly.

    `preset` supplies `seed`, `model` and `data`; DeepSpeed's sections overwrite keys inside them
    (e.g. `model.compute_dtype`). `model_source` names where the preset was chosen (`--model=...`);
    None means the default preset, whose sizes the file may change. `overrides` (`section.key=value`)
    fill "auto" values and win over everything; `devices` is the device count the batch keys assume.
    """
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config: got {type(ds).__name__}; expected a JSON object")
    unknown = sorted(set(ds) - TRANSLATED_SECTIONS - set(UNTRANSLATED_SECTIONS))
    if unknown:
        raise UserError(f"DeepSpeed config '{unknown[0]}': unknown top-level section; jaxllm knows "
                        f"{', '.join(sorted(TRANSLATED_SECTIONS | set(UNTRANSLATED_SECTIONS)))}")
    options = config_lib.parse_overrides(overrides or [])
    out = Translation(options)
    for key in ("seed", "model", "data"):
        if preset and key in preset:
            out.config[key] = json.loads(json.dumps(preset[key]))  # a deep copy
    if ds.get("gradient_clipping") == AUTO:
        out.auto("gradient_clipping", "optimizer.grad_clip")
    else:  # 0 (no clipping) unless asked, as in DeepSpeed
        clip = typed(ds.get("gradient_clipping", 0.0), (int, float), "gradient_clipping", "a number >= 0 or \"auto\"")
        out.set("optimizer.grad_clip", float(clip))
    if "steps_per_print" in ds:
        out.set("train.log_every", typed(ds["steps_per_print"], int, "steps_per_print", "a positive integer"))
    _precision(ds, out)
    lr = deepspeed_optimizer.translate_optimizer(ds, out) if "optimizer" in ds else None
    if "optimizer" not in ds:
        defaults = config_lib.Config()
        out.note("(optimizer)", "none in the file (DeepSpeed then uses the script's own): jaxllm's default AdamW "
                 f"applies (optimizer.b2={defaults.optimizer.b2}, optimizer.weight_decay="
                 f"{defaults.optimizer.weight_decay}, train.lr={defaults.train.lr}) unless overridden")
    if "scheduler" in ds:
        lr = deepspeed_optimizer.translate_scheduler(ds, out, lr)
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
    for key, translator in (("activation_checkpointing", _activation_checkpointing), ("tensorboard", _tensorboard),
                            ("pipeline", _pipeline), ("compression_training", _compression)):
        if key in ds:
            translator(ds, out)
    _data_efficiency(ds, out)
    for key in sorted(set(ds) & set(UNTRANSLATED_SECTIONS)):
        out.note(key, UNTRANSLATED_SECTIONS[key])
    mesh = {**out.config.get("mesh", {}), **(options.get("mesh") or {})}
    world = deepspeed_batch.data_parallel_size(mesh, devices)
    for key, value in deepspeed_batch.translate_batch(ds, options.get("train") or {}, world, out.note).items():
        out.set(f"train.{key}", value)
    explicit = {field: model_source for field in ("model.layers", "data.seq_len") if model_source}
    chosen = {f: out.option(f) for f in ("model.layers", "data.seq_len") if out.option(f) is not None}
    explicit |= {f: f"{f}={value} on the command line" for f, value in chosen.items()}
    deepspeed_model.fit(out.config, deepspeed_model.needs(out.config), explicit, out.note, chosen)
    config = _with_overrides(out, options)
    deepspeed_model.drop_unmatched_rules(config, out.rule_sources, out.note)
    if "steps" not in config.get("train", {}):
        out.note("(training length)", "a ds_config has no step count unless a scheduler gives total_num_steps; "
                 f"train.steps keeps jaxllm's default ({config_lib.TrainConfig.steps}): set it")
    config_lib.from_dict(json.loads(json.dumps(config)))  # the result must be a valid jaxllm config
    return config, out.notes


def _with_overrides(out: Translation, options: Mapping[str, Any]) -> dict[str, Any]:
    """The translation with the command line's values merged over it; each value they replace is reported."""
    def merge(base: dict[str, Any], extra: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        merged = dict(base)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merged[key] = merge(base[key], value, f"{prefix}{key}.")
                continue
            if base.get(key) is not None and base[key] != value:
                out.note(f"({prefix}{key})", f"{value!r} from the command line replaces {base[key]!r}")
            merged[key] = value
        return merged

    return merge(out.config, options, "")


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
    parser.add_argument("--model", help="jaxllm YAML whose seed/model/data sections the output uses (default: "
                        "configs/quickstart.yaml, resized to what the DeepSpeed file implies)")
    parser.add_argument("--devices", type=int, help="devices the run will use: with train_micro_batch_size_per_gpu "
                        "they give train.grad_accum (default: one)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides; they fill \"auto\" values")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        parser.error(f"expected section.key=value overrides, got {bad[0]!r}")

    def run() -> None:
        preset = config_lib.read_yaml(args.model or DEFAULT_PRESET)
        config, notes = translate(read(args.ds_config), preset, args.overrides, args.devices,
                                  f"--model={args.model}" if args.model else None)
        for key, reason in notes:
            print(f"not translated: {key}: {reason}", file=sys.stderr)
        print(render(config, notes, args.ds_config), end="")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
