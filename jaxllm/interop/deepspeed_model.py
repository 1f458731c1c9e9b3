"""What a DeepSpeed config says about the model, checked against the jaxllm model (for `jaxllm.interop.deepspeed`).

A ds_config has no model section, but some of its features only make sense for one model: random-LTD
names the layer count (`total_layer_num`) and layer ids, a sequence-length curriculum and random-LTD's
schedule end at the training sequence length, XTC's layer reduction names teacher layers, and
compression groups name modules. Without `--model` (and without `model.layers` / `data.seq_len`
overrides) the translation takes what the file implies; with them, a disagreement is an error naming
the option to change. Compression groups that match no module of the model (a BERT recipe names
`attention.self`, `intermediate`) are dropped and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxllm import config as config_lib
from jaxllm.compression import rules as rules_lib
from jaxllm.errors import UserError

Note = Callable[[str, str], None]
SEQLEN_METRICS = ("seqlen_truncate", "seqlen_reshape")


@dataclasses.dataclass(frozen=True)
class Need:
    """`field` (model.layers or data.seq_len) must equal (`exact`) or be at least `value`, for `key`.
    `implied`: without an explicit model the field takes this value (a file's sequence length)."""

    key: str
    field: str
    value: int
    exact: bool = False
    implied: bool = False


def needs(config: Mapping[str, Any]) -> list[Need]:
    """The model sizes the translated `random_ltd`, `curriculum` and `compression` sections depend on."""
    found = []
    ltd = config.get("random_ltd") or {}
    if ltd.get("enabled"):
        if ltd.get("total_layer_num") is not None:
            found.append(Need("random_ltd.total_layer_num", "model.layers", ltd["total_layer_num"], True, True))
        if ltd.get("random_ltd_layer_id"):
            found.append(Need("random_ltd.random_ltd_layer_id", "model.layers", max(ltd["random_ltd_layer_id"]) + 1))
        high = (ltd.get("random_ltd_schedule") or {}).get("max_value")
        if isinstance(high, int):
            found.append(Need("random_ltd.random_ltd_schedule.max_value", "data.seq_len", high, implied=True))
    curriculum = config.get("curriculum") or {}
    if curriculum.get("enabled"):
        for name, metric in (curriculum.get("curriculum_metrics") or {}).items():
            high = _longest(metric)
            if name in SEQLEN_METRICS and high is not None:
                found.append(Need(f"curriculum.curriculum_metrics.{name}.max_difficulty", "data.seq_len", high,
                                  implied=True))
    teacher = ((config.get("compression") or {}).get("layer_reduction") or {}).get("teacher_layer")
    if teacher:
        found.append(Need("compression.layer_reduction.teacher_layer", "model.layers", max(teacher) + 1))
    return found


def _longest(metric: Mapping[str, Any]) -> int | None:
    if metric.get("schedule_type") == "fixed_discrete":
        levels = (metric.get("schedule_config") or {}).get("difficulty")
        return max(levels) if levels and all(isinstance(v, int) for v in levels) else None
    high = metric.get("max_difficulty")
    return high if isinstance(high, int) and not isinstance(high, bool) else None


def fit(config: dict[str, Any], found: list[Need], explicit: Mapping[str, str], note: Note,
        chosen: Mapping[str, int] | None = None) -> None:
    """Sets model.layers / data.seq_len (and model.max_len) in `config` from `found` unless `explicit`
    names where the field was chosen (`--model=...`, an override, whose values `chosen` holds); then a
    disagreement is an error."""
    defaults = config_lib.Config()
    for field in ("model.layers", "data.seq_len"):
        mine = [need for need in found if need.field == field]
        if not mine:
            continue
        section, key = field.split(".")
        current = (chosen or {}).get(field, config.get(section, {}).get(key, getattr(getattr(defaults, section), key)))
        if field in explicit:
            for need in mine:
                if current != need.value if need.exact else current < need.value:
                    wanted = f"{field}={need.value}" if need.exact else f"{field} >= {need.value}"
                    raise UserError(f"DeepSpeed config '{need.key}' needs {wanted}; {explicit[field]} gives "
                                    f"{current}: choose a --model that fits or add {field}={need.value}")
            continue
        exact = sorted({need.value for need in mine if need.exact})
        if len(exact) > 1:
            raise UserError(f"DeepSpeed config: {' and '.join(n.key for n in mine if n.exact)} disagree on {field} "
                            f"({exact})")
        implied = [need.value for need in mine if need.implied]
        target = exact[0] if exact else max(implied) if implied else current
        target = max([target, *(need.value for need in mine if not need.exact and not need.implied)])
        if target == current:
            continue
        config.setdefault(section, {})[key] = target
        why = ", ".join(sorted({need.key for need in mine}))
        extra = ""
        if field == "data.seq_len" and target > config.get("model", {}).get("max_len", defaults.model.max_len):
            config.setdefault("model", {})["max_len"] = target
            extra = " and model.max_len"
        note(f"({field})", f"{field}{extra} = {target} from {why} (the default model has {current}); --model=YAML "
                           f"or {field}=N chooses another model")


def drop_unmatched_rules(config: dict[str, Any], sources: Mapping[str, str], note: Note) -> None:
    """Removes the compression rules that match no module of `config`'s model, reporting each by the
    DeepSpeed group it came from (`sources`: rule name -> DeepSpeed key)."""
    rules = (config.get("compression") or {}).get("rules") or {}
    if not rules:
        return
    model = config_lib.build_config(config_lib.ModelConfig, dict(config.get("model") or {}))
    modules = rules_lib.model_modules(model)
    names = ", ".join(dict.fromkeys(m.hf_name for m in modules if m.embedding or m.path[1:2] == (0,)))
    for name in list(rules):
        rule = rules_lib.Rule(tuple(rules[name]["modules"]), name=name)
        if not any(rule.matches(m) for m in modules):
            del rules[name]
            note(sources.get(name, f"compression.rules.{name}"),
                 f"{list(rule.modules)} match no module of the {model.family} model, dropped (another model's "
                 f"names, e.g. BERT's?); its modules are named like {names} or blocks.N.attn.wq, blocks.N.mlp.w_in")
