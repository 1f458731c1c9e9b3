"""Typed run configuration: YAML files, `section.key=value` overrides, strict validation.

Every section is a small dataclass with defaults that run. Unknown keys, wrong types and invalid
values raise `UserError` with one line naming the key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxllm.errors import UserError

Family = Literal["gpt2", "llama", "bloom"]
Dtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots"]


@dataclasses.dataclass
class ModelConfig:
    family: Family = "gpt2"
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    kv_heads: int | None = None  # None: as many as `heads` (no grouping)
    d_ff: int | None = None  # None: 4 * d_model (gpt2, bloom) or the SwiGLU size (llama)
    vocab_size: int = 1024
    max_len: int = 512
    compute_dtype: Dtype = "float32"
    remat: Remat = "none"
    tie_embeddings: bool | None = None  # None: the family's choice (gpt2, bloom tie; llama does not)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # A local Hugging Face directory (config.json + safetensors) whose weights start training; its
    # config.json fixes the architecture (see jaxllm/interop/hf.py `resolve_model_config`).
    init_from: str | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "llama":  # 2/3 of 4d, rounded up to a multiple of 64 as Llama does
            return 64 * -(-int(8 * self.d_model / 3) // 64)
        return 4 * self.d_model

    @property
    def tied(self) -> bool:
        return self.family != "llama" if self.tie_embeddings is None else self.tie_embeddings

    def validate(self) -> None:
        for key in ("layers", "d_model", "heads", "vocab_size", "max_len"):
            _require(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "a positive integer")
        _require(self.d_model % self.heads == 0, "model.d_model", self.d_model,
                 f"a multiple of model.heads={self.heads}")
        if self.kv_heads is not None:
            _require(self.kv_heads > 0 and self.heads % self.kv_heads == 0, "model.kv_heads", self.kv_heads,
                     f"a positive divisor of model.heads={self.heads}")
        if self.family == "llama":
            _require(self.head_dim % 2 == 0, "model.d_model", self.d_model,
                     "an even head size (d_model / heads) for rotary embeddings")
        if self.d_ff is not None:
            _require(self.d_ff > 0, "model.d_ff", self.d_ff, "a positive integer or null")
        if self.init_from is not None:
            _require(bool(self.init_from.strip()), "model.init_from", self.init_from,
                     "a Hugging Face checkpoint directory or null")


@dataclasses.dataclass
class DataConfig:
    source: Literal["synthetic", "text", "tokens"] = "synthetic"
    # text: corpus files (.jsonl with a "text" field, or .txt); empty means the offline stdlib corpus.
    # tokens: a directory written by `python -m jaxllm.data.prepare`.
    path: str | None = None
    seq_len: int = 128
    tokenizer: str | None = None  # text: a SentencePiece model; None trains one of model.vocab_size
    cache_dir: str | None = None  # text: where tokenized shards go; None means WORKDIR/data
    eval_fraction: float = 0.05
    synthetic_rows: int = 4096

    def validate(self) -> None:
        _require(self.seq_len > 0, "data.seq_len", self.seq_len, "a positive integer")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a value in [0, 1)")
        _require(self.synthetic_rows > 0, "data.synthetic_rows", self.synthetic_rows, "a positive integer")
        if self.source == "tokens":
            _require(self.path is not None, "data.path", self.path, "a token-shard directory when data.source=tokens")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, in sequences
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 10
    log_every: int = 10

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(self.lr > 0, "train.lr", self.lr, "a positive number")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "a value in [0, 1]")
        _require(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
                 f"a multiple of train.grad_accum={self.grad_accum}")


@dataclasses.dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it

    def validate(self) -> None:
        _require(0.0 <= self.b1 < 1.0, "optimizer.b1", self.b1, "a value in [0, 1)")
        _require(0.0 <= self.b2 < 1.0, "optimizer.b2", self.b2, "a value in [0, 1)")
        _require(self.eps > 0, "optimizer.eps", self.eps, "a positive number")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "a number >= 0")


@dataclasses.dataclass
class EvalConfig:
    every: int = 0  # 0 disables periodic evaluation
    batches: int = 2

    def validate(self) -> None:
        _require(self.every >= 0, "eval.every", self.every, "an integer >= 0")
        _require(self.batches > 0, "eval.batches", self.batches, "a positive integer")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end of the run
    keep: int = 3
    async_save: bool = True

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        _require(self.keep > 0, "checkpoint.keep", self.keep, "a positive integer")


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: all devices left after the other axes
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 3  # what `fsdp` shards: 1 optimizer, 2 + gradients, 3 + parameters

    def validate(self) -> None:
        sizes = {k: getattr(self, k) for k in ("data", "fsdp", "tensor", "sequence")}
        for key, size in sizes.items():
            _require(size == -1 or size > 0, f"mesh.{key}", size, "a positive integer or -1")
        _require(sum(size == -1 for size in sizes.values()) <= 1, "mesh", sizes, "at most one axis set to -1")


@dataclasses.dataclass
class DistributedConfig:
    # Empty coordinator and auto=false: one process. auto=true lets JAX discover the cluster (TPU pods, SLURM).
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False

    def validate(self) -> None:
        _require(self.num_processes > 0, "distributed.num_processes", self.num_processes, "a positive integer")
        _require(0 <= self.process_id < self.num_processes, "distributed.process_id", self.process_id,
                 f"an integer in [0, {self.num_processes})")


@dataclasses.dataclass
class LogConfig:
    progress_bar: bool = True
    tensorboard: bool = True


@dataclasses.dataclass
class Config:
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def validate(self) -> Config:
        for field in dataclasses.fields(self):
            section = getattr(self, field.name)
            if hasattr(section, "validate"):
                section.validate()
        _require(self.data.seq_len <= self.model.max_len, "data.seq_len", self.data.seq_len,
                 f"at most model.max_len={self.model.max_len}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': got {value!r}; expected {allowed}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against a field's type, allowing only lossless conversions (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise UserError(f"config key '{key}': got {value!r}; expected one of {', '.join(map(repr, choices))}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    raise UserError(f"config key '{key}': got {value!r} ({type(value).__name__}); expected {annotation.__name__}")


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[field.name]):
            keys.extend(_known_keys(hints[field.name], name + "."))
    return keys


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, _known_keys(Config), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config key '{prefix.rstrip('.')}': got {values!r}; expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key)
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key + ".")
        else:
            kwargs[name] = _coerce(key, value, annotation)
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turns `["model.layers=4", "train.lr=1e-3"]` into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected section.key=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and _looks_numeric(value):  # YAML reads 3e-4 as a string
            value = float(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is a value, not a section")
        node[parts[-1]] = value
    return nested


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _numbers_from_strings(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _numbers_from_strings(v) for k, v in tree.items()}
    if isinstance(tree, str) and _looks_numeric(tree) and any(c in tree.lower() for c in "e."):
        return float(tree)
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {' '.join(str(err).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file '{path}': expected a mapping at the top level, got {type(loaded).__name__}")
    return _numbers_from_strings(loaded)


def from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values).validate()


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config (or the defaults), applies `key=value` overrides and validates the result."""
    values = read_yaml(path) if path is not None else {}
    return from_dict(_merge(values, parse_overrides(overrides or [])))
