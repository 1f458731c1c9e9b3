"""Which modules get which weight bits, groups and activation bits: regex rules over module paths.

The compressible modules of a decoder are its matmul weights and its token embedding, named by their
parameter paths (`jaxllm.compression.model_modules`):

| path                      | matmul view          | Hugging Face name: gpt2 / llama / bloom                     |
|---------------------------|----------------------|-------------------------------------------------------------|
| `embed` (+ tied head)     | `[vocab, d]`, by row | `wte` / `embed_tokens` / `word_embeddings`                  |
| `blocks.{i}.attn.wq/wk/wv`| `[d, heads * hd]`    | `attn.c_attn` / `self_attn.q_proj` (k, v) / `query_key_value` |
| `blocks.{i}.attn.wo`      | `[heads * hd, d]`    | `attn.c_proj` / `self_attn.o_proj` / `self_attention.dense` |
| `blocks.{i}.mlp.w_in`     | `[d, ffn]`           | `mlp.c_fc` / `mlp.up_proj` / `mlp.dense_h_to_4h`            |
| `blocks.{i}.mlp.w_gate`   | `[d, ffn]`           | - / `mlp.gate_proj` / -                                     |
| `blocks.{i}.mlp.w_out`    | `[ffn, d]`           | `mlp.c_proj` / `mlp.down_proj` / `mlp.dense_4h_to_h`        |
| `head` (untied models)    | `[d, vocab]`         | `lm_head`                                                   |

(full names carry the model prefix, e.g. `transformer.h.0.attn.c_attn`, `model.layers.0.mlp.up_proj`)

A `Rule` lists regexes (`re.search`, as DeepSpeed matches module names); a module matches when a
regex finds its jaxllm path or its Hugging Face name, so DeepSpeed recipes written for Hugging Face
models (`"attn.c_attn"`, `"mlp.c_fc"`) apply unchanged. Rules are applied in order and a later
matching rule overrides the weight settings (when it sets `weight_bits`) and the activation settings
(when it sets `act_bits`) of earlier ones, as re-applying a DeepSpeed group does. A rule that matches
no module is reported with a warning that lists the module names. Embeddings always use one group per
row (DeepSpeed's embedding quantizer) and quantize no activations.

`from_deepspeed(cfg)` translates DeepSpeed's `compression_training` JSON (weight_quantization,
activation_quantization, layer_reduction) into rules and a layer-reduction list.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from jaxllm.compression.qtensor import QuantSettings, QuantSpec
from jaxllm.compression.quantizers import check_bits
from jaxllm.config import ModelConfig
from jaxllm.errors import UserError

Path = tuple[Any, ...]

_HF_BLOCK = {
    "gpt2": ("transformer.h.{i}.", {"attn.wq": "attn.c_attn", "attn.wk": "attn.c_attn", "attn.wv": "attn.c_attn",
                                     "attn.wo": "attn.c_proj", "mlp.w_in": "mlp.c_fc", "mlp.w_out": "mlp.c_proj"}),
    "llama": ("model.layers.{i}.", {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
                                    "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
                                    "mlp.w_in": "mlp.up_proj", "mlp.w_gate": "mlp.gate_proj",
                                    "mlp.w_out": "mlp.down_proj"}),
    "bloom": ("transformer.h.{i}.", {"attn.wq": "self_attention.query_key_value",
                                     "attn.wk": "self_attention.query_key_value",
                                     "attn.wv": "self_attention.query_key_value", "attn.wo": "self_attention.dense",
                                     "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h"}),
}
_HF_EMBED = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "bloom": "transformer.word_embeddings"}


@dataclasses.dataclass(frozen=True)
class Module:
    """A compressible weight: its parameter path, Hugging Face name and matmul layout."""

    path: Path
    hf_name: str
    contract: int
    embedding: bool = False

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)


def model_modules(cfg: ModelConfig) -> list[Module]:
    """The compressible modules of a decoder built from `cfg`, in forward order."""
    prefix, table = _HF_BLOCK[cfg.family]
    modules = [Module(("embed",), _HF_EMBED[cfg.family], 1, embedding=True)]
    for i in range(cfg.layers):
        names = ["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_in"]
        names += ["mlp.w_gate"] if cfg.family == "llama" else []
        for name in names + ["mlp.w_out"]:
            owner, weight = name.split(".")
            modules.append(Module(("blocks", i, owner, weight), prefix.format(i=i) + table[name],
                                  2 if name == "attn.wo" else 1))
    if not cfg.tied:
        modules.append(Module(("head",), "lm_head", 1))
    return modules


@dataclasses.dataclass(frozen=True)
class Rule(QuantSettings):
    """Compression settings for the modules whose path or Hugging Face name matches one of `modules`.

    weight_bits None leaves the weight settings to other rules; act_bits None likewise for the input
    activations (see `QuantSettings`).
    """

    modules: tuple[str, ...]
    name: str = "rule"

    def __post_init__(self):
        if isinstance(self.modules, str) or not self.modules:
            raise UserError(f"compression rule '{self.name}': 'modules' must be a non-empty list of regexes")
        object.__setattr__(self, "modules", tuple(self.modules))
        for pattern in self.modules:
            try:
                re.compile(pattern)
            except re.error as err:
                raise UserError(f"compression rule '{self.name}': module regex {pattern!r} is invalid ({err})"
                                ) from None
        if self.weight_bits is not None:
            check_bits(self.weight_bits, f"compression rule '{self.name}': weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, f"compression rule '{self.name}': act_bits")
        if isinstance(self.weight_groups, bool) or not isinstance(self.weight_groups, int) or self.weight_groups < 1:
            raise UserError(f"compression rule '{self.name}': weight_groups must be a positive integer, "
                            f"got {self.weight_groups!r}")

    def matches(self, module: Module) -> bool:
        return any(re.search(p, module.name) or re.search(p, module.hf_name) for p in self.modules)


def plan(cfg: ModelConfig, rules: Sequence[Rule], shapes: dict[str, tuple[int, ...]],
         implementation: str = "auto") -> dict[str, QuantSpec]:
    """The `QuantSpec` of every module some rule compresses, keyed by module name (dotted path).

    `shapes` (module name -> weight shape, `module_shapes`) sets the embedding's one group per row and
    checks every spec against its weight (bits, groups, layout). Warns (UserWarning) about rules that
    match no module, listing the module names.
    """
    modules = model_modules(cfg)
    specs: dict[str, QuantSpec] = {}
    unmatched = []
    for rule in rules:
        hits = [m for m in modules if rule.matches(m)]
        if not hits:
            unmatched.append(rule)
        for m in hits:
            spec = specs.get(m.name) or QuantSpec(m.name, contract=m.contract, transposed=not m.embedding,
                                                  implementation=implementation)
            if rule.weight_bits is not None:
                groups = 1 if m.embedding else rule.weight_groups  # replaced by one per row below
                spec = dataclasses.replace(spec, weight_bits=rule.weight_bits, weight_groups=groups,
                                           weight_symmetric=rule.weight_symmetric)
            if rule.act_bits is not None and not m.embedding:
                spec = dataclasses.replace(spec, act_bits=rule.act_bits, act_symmetric=rule.act_symmetric,
                                           act_static=rule.act_static)
            specs[m.name] = spec
    if unmatched:
        names = ", ".join(f"'{r.name}' ({', '.join(map(repr, r.modules))})" for r in unmatched)
        warnings.warn(f"compression rules that match no module: {names}. The model's modules are: "
                      f"{', '.join(m.name for m in modules)} (Hugging Face names: "
                      f"{', '.join(sorted({m.hf_name for m in modules}))})", UserWarning, stacklevel=2)
    specs = {k: v for k, v in specs.items() if v.weight_bits is not None or v.act_bits is not None}
    for name, spec in specs.items():
        if spec.weight_bits is not None and not spec.transposed:  # embedding: one group per row
            spec = specs[name] = dataclasses.replace(spec, weight_groups=shapes[name][0])
        spec.validate(tuple(shapes[name]))
    return specs


def module_shapes(params: Any, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Weight shapes of the compressible modules, read from a params dict (or a tree of shapes)."""
    out = {}
    for m in model_modules(cfg):
        node = params
        for key in m.path:
            node = node[key]
        out[m.name] = tuple(node if isinstance(node, tuple) else node.shape)
    return out


# ----------------------------------------------------------------------------------------------------
# DeepSpeed `compression_training` translation


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Rules and layer reduction read from a DeepSpeed config."""

    rules: tuple[Rule, ...]
    teacher_layers: tuple[int, ...] | None = None


_WQ_SHARED = {"enabled": False, "quantizer_kernel": False, "schedule_offset": 0, "quantize_groups": 1,
              "quantize_verbose": False, "quantization_type": "symmetric", "quantize_weight_in_forward": False,
              "rounding": "nearest", "fp16_mixed_quantize": None}
_AQ_SHARED = {"enabled": False, "quantization_type": "symmetric", "range_calibration": "dynamic",
              "schedule_offset": 1000}
_LR_KEYS = {"enabled", "keep_number_layer", "module_name_prefix", "teacher_layer", "other_module_name"}
_PRUNING = ("sparse_pruning", "row_pruning", "head_pruning", "channel_pruning")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"DeepSpeed config '{where}': expected an object, got {type(value).__name__}")
    return value


def _known(section: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise UserError(f"DeepSpeed config '{where}': unknown key '{unknown[0]}'; expected "
                        f"{', '.join(sorted(allowed))}")


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise UserError(f"DeepSpeed config '{where}': got {value!r}; expected one of {', '.join(allowed)}")
    return value


def _quantization(section: dict[str, Any], name: str, shared_keys: Iterable[str]) -> tuple[dict, dict, str | None]:
    """`compression_training.<name>` (weight or activation quantization), its checked `shared_parameters`
    and, when those are enabled, their quantization_type."""
    part = _mapping(section.get(name, {}), name)
    _known(part, {"shared_parameters", "different_groups"}, name)
    shared = _mapping(part.get("shared_parameters", {}), f"{name}.shared_parameters")
    _known(shared, shared_keys, f"{name}.shared_parameters")
    if not shared.get("enabled", False):
        return part, shared, None
    kind = _choice(shared.get("quantization_type", "symmetric"), ("symmetric", "asymmetric"),
                   f"{name}.shared_parameters.quantization_type")
    return part, shared, kind


def _groups(section: dict[str, Any], where: str, params_keys: set[str], required: set[str]):
    groups = _mapping(section.get("different_groups", {}), f"{where}.different_groups")
    for name, group in groups.items():
        gw = f"{where}.different_groups.{name}"
        group = _mapping(group, gw)
        _known(group, {"params", "modules", "related_modules"}, gw)
        params = _mapping(group.get("params", {}), gw + ".params")
        _known(params, params_keys, gw + ".params")
        missing = sorted(required - set(params))
        if missing:
            raise UserError(f"DeepSpeed config '{gw}.params': required key '{missing[0]}' is missing")
        modules = group.get("modules")
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise UserError(f"DeepSpeed config '{gw}.modules': expected a non-empty list of module-name regexes")
        yield name, params, modules


def from_deepspeed(cfg: dict[str, Any]) -> Recipe:
    """Rules (and teacher layers) from a DeepSpeed config or its `compression_training` section.

    weight_quantization groups give `weight_bits = target_bits` (a MoQ `start_bits` schedule is a
    training-time schedule; jaxllm quantizes at the target precision and warns when they differ),
    `quantize_groups` and `quantization_type`; activation_quantization groups give `bits`,
    `quantization_type` and `range_calibration`; layer_reduction gives `teacher_layer`. Pruning
    sections must be absent or disabled. Unknown keys are errors.
    """
    sections = {"weight_quantization", "activation_quantization", "layer_reduction", *_PRUNING}
    if "compression_training" in _mapping(cfg, "top level"):
        section = _mapping(cfg["compression_training"], "compression_training")
    elif set(cfg) <= sections:  # the section itself
        section = cfg
    else:
        raise UserError("DeepSpeed config: no 'compression_training' section")
    _known(section, sections, "compression_training")
    for name in _PRUNING:
        if _mapping(section.get(name, {}), name).get("shared_parameters", {}).get("enabled", False):
            raise UserError(f"DeepSpeed config 'compression_training.{name}': pruning is not supported by jaxllm; "
                            "disable it or remove the section")
    rules: list[Rule] = []
    wq, shared, kind = _quantization(section, "weight_quantization", _WQ_SHARED)
    if shared.get("enabled", False):
        where = "weight_quantization.shared_parameters"
        _choice(shared.get("rounding", "nearest"), ("nearest",), where + ".rounding")
        groups = shared.get("quantize_groups", 1)
        mixed = shared.get("fp16_mixed_quantize") or {}
        if _mapping(mixed, where + ".fp16_mixed_quantize").get("enabled", False):
            warnings.warn("DeepSpeed fp16_mixed_quantize is a training-time blend; jaxllm quantizes fully",
                          UserWarning, stacklevel=2)
        for name, params, modules in _groups(wq, "weight_quantization", {"start_bits", "target_bits",
                                                                          "quantization_period"},
                                             {"start_bits", "target_bits"}):
            check_bits(params["target_bits"], f"DeepSpeed config 'weight_quantization.different_groups.{name}.params"
                                              ".target_bits'")
            if params["start_bits"] != params["target_bits"]:
                warnings.warn(f"DeepSpeed weight_quantization group '{name}': start_bits {params['start_bits']} -> "
                              f"target_bits {params['target_bits']} is MoQ's training schedule; jaxllm uses "
                              f"target_bits={params['target_bits']}", UserWarning, stacklevel=2)
            rules.append(Rule(tuple(modules), weight_bits=params["target_bits"], weight_groups=groups,
                              weight_symmetric=kind == "symmetric", name=f"weight_quantization.{name}"))
    aq, shared, kind = _quantization(section, "activation_quantization", _AQ_SHARED)
    if shared.get("enabled", False):
        where = "activation_quantization.shared_parameters"
        calibration = _choice(shared.get("range_calibration", "dynamic"), ("dynamic", "static"),
                              where + ".range_calibration")
        for name, params, modules in _groups(aq, "activation_quantization", {"bits"}, {"bits"}):
            check_bits(params["bits"], f"DeepSpeed config 'activation_quantization.different_groups.{name}"
                                       ".params.bits'")
            rules.append(Rule(tuple(modules), act_bits=params["bits"], act_symmetric=kind == "symmetric",
                              act_static=calibration == "static", name=f"activation_quantization.{name}"))
    teacher_layers = None
    lr = _mapping(section.get("layer_reduction", {}), "layer_reduction")
    _known(lr, _LR_KEYS, "layer_reduction")
    if lr.get("enabled", False):
        layers = lr.get("teacher_layer")
        if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
            raise UserError("DeepSpeed config 'layer_reduction.teacher_layer': expected a non-empty list of layer ids")
        keep = lr.get("keep_number_layer", len(layers))
        if keep != len(layers):
            raise UserError(f"DeepSpeed config 'layer_reduction.keep_number_layer': got {keep}; expected "
                            f"len(teacher_layer) = {len(layers)}")
        teacher_layers = tuple(layers)
    return Recipe(tuple(rules), teacher_layers)
