"""DeepSpeed `data_efficiency` (and legacy `curriculum_learning`) config -> jaxllm `curriculum:` / `random_ltd:`.

    python -m jaxllm.interop.deepspeed_data_efficiency ds_config.json >> my_run.yaml

`translate(ds_config)` accepts a whole DeepSpeed config or just its `data_efficiency` section and returns
the jaxllm config sections as a plain dict (`jaxllm.config.from_dict` accepts it merged into a config).
DeepSpeed's keys keep their names in jaxllm; the keys that only steer PyTorch plumbing are checked
and dropped:

* `data_sampling.num_epochs`, `num_workers`: jaxllm's pipeline repeats without end and reads in-process;
* `data_cluster_path`: kept (accepted) but clusters are rebuilt in memory from the schedules;
* `random_ltd.model_mask_name`, `hidden_state_order`: the decoder needs neither;
  `model_type` must be `decoder` (jaxllm's models are decoders).

Unknown keys raise `UserError` naming the DeepSpeed key path, as jaxllm's own config does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxllm.errors import UserError, exit_status

_METRIC_KEYS = {"index_to_sample_path", "index_to_metric_path", "difficulty_type", "clustering_type",
                "min_difficulty", "max_difficulty", "schedule_type", "schedule_config"}
_SCHEDULE_KEYS = {"total_curriculum_step", "difficulty_step", "root_degree", "difficulty", "max_step"}
_LTD_KEYS = {"enabled", "total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id", "model_mask_name",
             "model_type", "hidden_state_order", "random_ltd_schedule", "layer_token_lr_schedule"}
# Keys that steer only DeepSpeed's PyTorch plumbing, and why jaxllm needs none of them.
DROPPED = {
    "num_epochs": "jaxllm's data pipeline repeats the data without end; train.steps sets the length",
    "num_workers": "jaxllm reads batches in-process",
    "model_mask_name": "jaxllm's decoder builds its own attention mask for the kept tokens",
    "hidden_state_order": "jaxllm's activations are always [batch, sequence, ...]",
    "index_to_sample_path": "a sequence-length metric needs no analyzer index",
    "index_to_metric_path": "a sequence-length metric needs no analyzer index",
    "total_layer_tokens": "jaxllm takes the LayerToken budget from train.steps x batch x seq_len",
    "warmup_type": "jaxllm warms the LayerToken schedule up linearly over train.warmup_steps",
}
Note = Callable[[str, str], None]


def _ignore(key: str, reason: str) -> None:
    """The default `note`: the standalone command drops these keys as its docstring says."""
    del key, reason


def _check_keys(section: Any, allowed: set[str], path: str) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        raise UserError(f"DeepSpeed config '{path}': got {section!r}; expected an object")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise UserError(f"DeepSpeed config '{path}.{unknown[0]}': unknown key; expected one of "
                        f"{', '.join(sorted(allowed))}")
    return section


def _schedule(config: Mapping[str, Any], path: str) -> dict[str, Any]:
    return dict(_check_keys(config or {}, _SCHEDULE_KEYS, path))


def _metric(name: str, config: Any, path: str, note: Note) -> dict[str, Any]:
    config = _check_keys(config, _METRIC_KEYS, path)
    out = {k: v for k, v in config.items() if k != "schedule_config"}
    out["schedule_config"] = _schedule(config.get("schedule_config"), f"{path}.schedule_config")
    if name in ("seqlen_truncate", "seqlen_reshape"):
        out.setdefault("clustering_type", "single_cluster")
        for key in ("index_to_sample_path", "index_to_metric_path"):  # DeepSpeed's examples pass "dummy" here
            if out.pop(key, None) is not None:
                note(f"{path}.{key}", DROPPED[key])
    return out


def _curriculum(section: Mapping[str, Any], seed: Any, path: str, note: Note) -> dict[str, Any]:
    section = _check_keys(section, {"enabled", "data_cluster_path", "curriculum_metrics"}, path)
    metrics = section.get("curriculum_metrics") or {}
    if not isinstance(metrics, Mapping):
        raise UserError(f"DeepSpeed config '{path}.curriculum_metrics': expected an object of metrics")
    out: dict[str, Any] = {"enabled": bool(section.get("enabled", False)),
                           "curriculum_metrics": {name: _metric(name, cfg, f"{path}.curriculum_metrics.{name}", note)
                                                  for name, cfg in metrics.items()}}
    if seed is not None:
        out["seed"] = seed
    if section.get("data_cluster_path"):
        out["data_cluster_path"] = section["data_cluster_path"]
    return out


def _random_ltd(section: Mapping[str, Any], path: str, note: Note) -> dict[str, Any]:
    section = _check_keys(section, _LTD_KEYS, path)
    if section.get("model_type", "decoder") != "decoder":
        raise UserError(f"DeepSpeed config '{path}.model_type': got {section['model_type']!r}; jaxllm's models are "
                        "decoders (expected 'decoder')")
    if section.get("hidden_state_order", "batch_seq_dim") not in ("batch_seq_dim", "seq_batch_dim"):
        raise UserError(f"DeepSpeed config '{path}.hidden_state_order': got {section['hidden_state_order']!r}; "
                        "expected batch_seq_dim or seq_batch_dim")
    out = {k: section[k] for k in ("enabled", "total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id")
           if k in section}
    for key in ("model_mask_name", "hidden_state_order"):
        if key in section:
            note(f"{path}.{key}", DROPPED[key])
    sched = _check_keys(section.get("random_ltd_schedule") or {}, {"min_value", "max_value", "schedule_type",
                                                                     "schedule_config"}, f"{path}.random_ltd_schedule")
    out["random_ltd_schedule"] = {**{k: v for k, v in sched.items() if k != "schedule_config"},
                                  "schedule_config": dict(_check_keys(sched.get("schedule_config") or {},
                                                                      {"require_steps", "seq_per_step"},
                                                                      f"{path}.random_ltd_schedule.schedule_config"))}
    lr = section.get("layer_token_lr_schedule")
    if lr is not None:
        where = f"{path}.layer_token_lr_schedule"
        lr = _check_keys(lr, {"enabled", "total_layer_tokens", "warmup_type"}, where)
        out["layer_token_lr_schedule"] = {"enabled": bool(lr.get("enabled", False))}
        for key in sorted(set(lr) - {"enabled"}):
            note(f"{where}.{key}", DROPPED[key])
    return out


def translate(ds_config: Mapping[str, Any], note: Note = _ignore) -> dict[str, Any]:
    """jaxllm config sections (`curriculum`, `random_ltd`) equivalent to a DeepSpeed config.

    `note(key, reason)` is told about each DeepSpeed key that is checked but dropped (`DROPPED`).

    Example:

    >>> translate({"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
    ...     "enabled": True, "random_ltd_layer_id": [1, 2], "model_type": "decoder",
    ...     "random_ltd_schedule": {"min_value": 64, "max_value": 256, "schedule_type": "fixed_linear",
    ...                             "schedule_config": {"require_steps": 100, "seq_per_step": 16}}}}}})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'random_ltd': {'enabled': True, 'random_ltd_layer_id': [1, 2], 'random_ltd_schedule': {'min_value': 64,
     'max_value': 256, 'schedule_type': 'fixed_linear', 'schedule_config': {'require_steps': 100,
     'seq_per_step': 16}}}}
    """
    if not isinstance(ds_config, Mapping):
        raise UserError(f"DeepSpeed config: got {type(ds_config).__name__}; expected a JSON object")
    out: dict[str, Any] = {}
    legacy = ds_config.get("curriculum_learning")
    if legacy:
        legacy = _check_keys(legacy, {"enabled", "curriculum_type", "min_difficulty", "max_difficulty",
                                      "schedule_type", "schedule_config"}, "curriculum_learning")
        if legacy.get("curriculum_type", "seqlen") != "seqlen":
            raise UserError(f"DeepSpeed config 'curriculum_learning.curriculum_type': got "
                            f"{legacy['curriculum_type']!r}; expected 'seqlen'")
        metric = {k: legacy[k] for k in ("min_difficulty", "max_difficulty", "schedule_type") if k in legacy}
        metric["schedule_config"] = _schedule(legacy.get("schedule_config"), "curriculum_learning.schedule_config")
        metric["clustering_type"] = "single_cluster"
        out["curriculum"] = {"enabled": bool(legacy.get("enabled", False)),
                             "curriculum_metrics": {"seqlen_truncate": metric}}
    top_keys = {"enabled", "seed", "data_sampling", "data_routing"}
    section = ds_config.get("data_efficiency") if "data_efficiency" in ds_config else (
        ds_config if set(ds_config) & {"data_sampling", "data_routing"} else None)
    if section is None:
        return out
    section = _check_keys(section, top_keys, "data_efficiency")
    enabled = bool(section.get("enabled", False))
    sampling = section.get("data_sampling")
    if sampling:
        sampling = _check_keys(sampling, {"enabled", "num_epochs", "num_workers", "curriculum_learning"},
                               "data_efficiency.data_sampling")
        for key in ("num_epochs", "num_workers"):
            if key in sampling:
                note(f"data_efficiency.data_sampling.{key}", DROPPED[key])
        cl = sampling.get("curriculum_learning")
        if cl:
            if "curriculum" in out:
                raise UserError("DeepSpeed config: both the legacy 'curriculum_learning' and "
                                "'data_efficiency.data_sampling.curriculum_learning' are set; keep one")
            out["curriculum"] = _curriculum(cl, section.get("seed", 1234),
                                            "data_efficiency.data_sampling.curriculum_learning", note)
            out["curriculum"]["enabled"] &= enabled and bool(sampling.get("enabled", False))
    routing = section.get("data_routing")
    if routing:
        routing = _check_keys(routing, {"enabled", "random_ltd"}, "data_efficiency.data_routing")
        if routing.get("random_ltd"):
            out["random_ltd"] = _random_ltd(routing["random_ltd"], "data_efficiency.data_routing.random_ltd", note)
            out["random_ltd"]["enabled"] = (bool(out["random_ltd"].get("enabled", False)) and enabled
                                            and bool(routing.get("enabled", False)))
    return out


def read(path: str | Path) -> dict[str, Any]:
    """`translate` of a DeepSpeed JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config file '{path}' does not exist")
    try:
        return translate(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config file '{path}' is not valid JSON: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxllm.interop.deepspeed_data_efficiency",
        description="Print the jaxllm curriculum: / random_ltd: sections of a DeepSpeed config's data_efficiency "
                    "(or legacy curriculum_learning) section, to append to a jaxllm YAML config. "
                    "python -m jaxllm.interop.deepspeed translates the whole file.")
    parser.add_argument("ds_config", help="DeepSpeed JSON config")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return exit_status(lambda: print(yaml.safe_dump(read(args.ds_config), sort_keys=False), end=""))


if __name__ == "__main__":
    sys.exit(main())
