"""The state of one DeepSpeed -> jaxllm translation and the typed readers every section translator uses
(`jaxllm.interop.deepspeed`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxllm import config as config_lib
from jaxllm.errors import UserError

AUTO = "auto"  # the Hugging Face Trainer's placeholder for a value it fills in from its own arguments


class Translation:
    """The jaxllm config being built, the report of what did not carry over, and the run's options
    (the command line's `key=value` overrides) that fill DeepSpeed's "auto" values."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.config: dict[str, Any] = {}
        self.notes: list[tuple[str, str]] = []  # (DeepSpeed key, reason)
        self.options = dict(options or {})
        self.rule_sources: dict[str, str] = {}  # compression rule name -> its DeepSpeed group

    def set(self, dotted: str, value: Any) -> None:
        section, key = dotted.split(".")
        self.config.setdefault(section, {})[key] = value

    def note(self, key: str, reason: str) -> None:
        self.notes.append((key, reason))

    def option(self, dotted: str) -> Any:
        """The command line's value of `dotted` (section.key), or None."""
        section, key = dotted.split(".")
        return (self.options.get(section) or {}).get(key)

    def auto(self, key: str, dotted: str) -> None:
        """Reports DeepSpeed `key`'s "auto": jaxllm's `dotted` comes from the command line, or else keeps
        the value the preset or jaxllm's defaults give it."""
        if self.option(dotted) is not None:
            self.note(key, f"auto: {dotted}={self.option(dotted)!r} from the command line")
            return
        section, name = dotted.split(".")
        if name in self.config.get(section, {}):  # the preset's model/data sections
            where = f"{self.config[section][name]!r} from the model preset"
        else:
            where = f"jaxllm's default {getattr(getattr(config_lib.Config(), section), name)!r}"
        self.note(key, f"auto: {dotted} keeps {where}; set {dotted}=VALUE to choose")


def typed(value: Any, kind: type | tuple[type, ...], key: str, allowed: str) -> Any:
    """`value` when it is a `kind` (bools are never numbers here), else a UserError naming the key."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise UserError(f"DeepSpeed config '{key}': got {value!r}; expected {allowed}")
    return value


def mapping(ds: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """Section `key` of `ds`, which must be a JSON object."""
    return typed(ds[key], dict, key, "an object")


def number(params: Mapping[str, Any], key: str, where: str, out: Translation, dotted: str,
           default: Any = None) -> float | None:
    """A numeric parameter; None when absent without default or "auto" (then reported against `dotted`)."""
    value = params.get(key, default)
    if value == AUTO:
        out.auto(f"{where}.{key}", dotted)
        return None
    return None if value is None else float(typed(value, (int, float), f"{where}.{key}", "a number or \"auto\""))
