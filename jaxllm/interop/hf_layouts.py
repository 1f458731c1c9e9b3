"""How Hugging Face GPT-2, Llama and BLOOM checkpoints map onto jaxllm's decoder.

Two tables live here, both pure Python with no array library:

* config translation: a Hugging Face `config.json` dict <-> `jaxllm.config.ModelConfig`, rejecting
  every setting the jaxllm decoder cannot reproduce (the error names the field);
* tensor views: for each jaxllm parameter, which Hugging Face tensor holds it and how.

A `View` says: take the Hugging Face tensor, split each of its axes into sub-axes (`split`, never a
merge, so it is a free reshape), pick one index on some sub-axes (`take`, for fused projections),
then transpose the remaining sub-axes into jaxllm's order (`perm`)::

    param = transpose(reshape(hf_tensor, flat(split))[take], perm)

Examples, with d = d_model, h heads, k key/value heads, e = head size, f = MLP size:

| family | Hugging Face tensor                      | shape        | split              | take | jaxllm  |
|--------|------------------------------------------|--------------|--------------------|------|---------|
| gpt2   | h.i.attn.c_attn.weight (Conv1D, in x out)| [d, 3d]      | (d), (3, h, e)     | 1: q | wq [d, h, e] |
| llama  | layers.i.self_attn.k_proj.weight (out x in)| [k e, d]   | (k, e), (d)        |      | wk [d, k, e] |
| bloom  | h.i.self_attention.query_key_value.weight| [h 3 e, d]   | (h, 3, e), (d)     | 1: q | wq [d, h, e] |

BLOOM fuses q, k and v per head (`[heads, 3, head_dim]` rows) while GPT-2 fuses them per
projection (`[3, heads, head_dim]` columns); Llama's grouped-query k/v projections have `k` heads.
Llama checkpoints in Hugging Face layout already use the half-split rotary pairing (dimension i
rotates with i + e/2) that `jaxllm.models.decoder.rotary` implements, so no permutation is needed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bloom": "BloomForCausalLM"}
# The base model's prefix inside the *ForCausalLM checkpoint; some published files omit it.
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bloom": "transformer."}
# Buffers some older checkpoints carry that hold no learned values (causal masks, rotary tables).
IGNORED_SUFFIXES = {"gpt2": (".attn.bias", ".attn.masked_bias"), "llama": (".rotary_emb.inv_freq",), "bloom": ()}
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
GPT2_EXACT_GELU = "gelu"  # 0.5x(1 + erf(x / sqrt(2)))


def _fail(source: str, key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"{source}: field '{key}' is {value!r}; jaxllm supports {allowed}")


_REQUIRED = object()


def _get(hf: dict, source: str, keys: tuple[str, ...], kind: type, default: Any = _REQUIRED) -> Any:
    """The first of `keys` set in `hf` (aliases such as n_embd / hidden_size), type-checked."""
    for key in keys:
        value = hf.get(key)
        if value is None:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise UserError(f"{source}: field '{key}' is {value!r}; expected a {kind.__name__}")
        return value
    if default is _REQUIRED:
        raise UserError(f"{source}: required field '{keys[0]}' is missing")
    return default


def family_of(hf: dict, source: str) -> str:
    """The jaxllm family for a config.json, after checking `model_type` and `architectures`."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"{source}: model_type {model_type!r} is not supported; expected one of "
                        f"{', '.join(repr(k) for k in ARCHITECTURES)}")
    architectures = hf.get("architectures")
    if architectures is not None:
        wanted = ARCHITECTURES[model_type]
        if not isinstance(architectures, list) or architectures != [wanted]:
            owner = [fam for fam, arch in ARCHITECTURES.items() if isinstance(architectures, list)
                     and arch in architectures]
            if owner:
                raise UserError(f"{source}: model_type {model_type!r} does not match architectures "
                                f"{architectures!r} (a {owner[0]!r} model)")
            raise UserError(f"{source}: architectures {architectures!r} is not supported; for model_type "
                            f"{model_type!r} jaxllm reads [{wanted!r}]")
    return model_type


def _rope_theta(hf: dict, source: str) -> float:
    """Llama's rotary base from `rope_parameters` (transformers 5) or `rope_theta` (older files)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise _fail(source, "rope_parameters.rope_type", rope_type, "'default' rotary embeddings only")
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise _fail(source, "rope_parameters.partial_rotary_factor", factor, "1.0 only")
        return _get(params, source + " rope_parameters", ("rope_theta",), float, 10000.0)
    if params is not None:
        raise _fail(source, "rope_parameters", params, "a mapping or null")
    scaling = hf.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, dict)
                                or scaling.get("rope_type", scaling.get("type", "default")) != "default"):
        raise _fail(source, "rope_scaling", scaling, "null (no rotary scaling)")
    return _get(hf, source, ("rope_theta",), float, 10000.0)


def model_config_from_hf(hf: dict, source: str, max_len: int | None = None,
                         compute_dtype: str = "float32") -> ModelConfig:
    """Translates a Hugging Face config.json dict into a `ModelConfig`.

    Args:
      hf: the parsed config.json.
      source: the file's path, used in error messages.
      max_len: the longest sequence for families whose weights do not fix it (Llama and BLOOM have no
        position table; None takes `max_position_embeddings` / `seq_length`, else 2048). GPT-2's
        learned position table fixes it to `n_positions`.
      compute_dtype: the matmul input dtype of the returned config.

    Raises:
      UserError naming the field for an unsupported model type or a setting the decoder cannot
      reproduce (e.g. a GPT-2 `activation_function` other than a GELU, Llama `attention_bias`,
      rotary scaling, BLOOM `apply_residual_connection_post_layernorm`).
    """
    family = family_of(hf, source)
    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in (*GPT2_TANH_GELUS, GPT2_EXACT_GELU):
            raise _fail(source, "activation_function", act,
                        f"a GELU: tanh ({', '.join(GPT2_TANH_GELUS)}) or exact ({GPT2_EXACT_GELU})")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                raise _fail(source, key, hf.get(key), repr(want))
        d = _get(hf, source, ("n_embd", "hidden_size"), int)
        positions = _get(hf, source, ("n_positions", "n_ctx", "max_position_embeddings"), int)
        if max_len is not None and max_len != positions:
            raise UserError(f"{source}: GPT-2's position table holds n_positions={positions} rows; "
                            f"max_len={max_len} cannot differ")
        values = dict(layers=_get(hf, source, ("n_layer", "num_hidden_layers"), int), d_model=d,
                      heads=_get(hf, source, ("n_head", "num_attention_heads"), int),
                      d_ff=_get(hf, source, ("n_inner",), int, 4 * d), max_len=positions,
                      norm_eps=_get(hf, source, ("layer_norm_epsilon",), float, 1e-5),
                      tie_embeddings=_get(hf, source, ("tie_word_embeddings",), bool, True),
                      activation="gelu" if act == GPT2_EXACT_GELU else "gelu_tanh")
    elif family == "llama":
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if hf.get(key, want) != want:
                raise _fail(source, key, hf.get(key), repr(want))
        d = _get(hf, source, ("hidden_size",), int)
        heads = _get(hf, source, ("num_attention_heads",), int)
        head_dim = hf.get("head_dim")
        if head_dim is not None and heads > 0 and head_dim * heads != d:
            raise _fail(source, "head_dim", head_dim, f"hidden_size / num_attention_heads = {d / heads:g} only")
        values = dict(layers=_get(hf, source, ("num_hidden_layers",), int), d_model=d, heads=heads,
                      kv_heads=_get(hf, source, ("num_key_value_heads",), int, heads),
                      d_ff=_get(hf, source, ("intermediate_size",), int),
                      max_len=max_len or _get(hf, source, ("max_position_embeddings",), int, 2048),
                      norm_eps=_get(hf, source, ("rms_norm_eps",), float, 1e-6),
                      rope_theta=_rope_theta(hf, source),
                      tie_embeddings=_get(hf, source, ("tie_word_embeddings",), bool, False))
    else:
        if hf.get("apply_residual_connection_post_layernorm", False):
            raise _fail(source, "apply_residual_connection_post_layernorm", True, "false only")
        d = _get(hf, source, ("hidden_size", "n_embed"), int)
        values = dict(layers=_get(hf, source, ("n_layer", "num_hidden_layers"), int), d_model=d,
                      heads=_get(hf, source, ("n_head", "num_attention_heads"), int), d_ff=4 * d,
                      max_len=max_len or _get(hf, source, ("seq_length",), int, 2048),
                      norm_eps=_get(hf, source, ("layer_norm_epsilon",), float, 1e-5),
                      tie_embeddings=_get(hf, source, ("tie_word_embeddings",), bool, True))
    cfg = ModelConfig(family=family, vocab_size=_get(hf, source, ("vocab_size",), int),
                      compute_dtype=compute_dtype, **values)
    try:
        cfg.validate()
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    return cfg


def hf_config_from_model(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json dict that `transformers` reads back as the same architecture.

    Raises UserError when the family's Hugging Face class cannot express the config (grouped-query
    attention in GPT-2 or BLOOM, a BLOOM MLP size other than 4 x d_model, or BLOOM with the exact GELU).
    """
    if cfg.family == "bloom" and cfg.activation != "gelu_tanh":
        raise UserError(f"model.activation={cfg.activation}: Hugging Face {ARCHITECTURES['bloom']} always uses "
                        "the tanh GELU; only the gpt2 family can be saved with the exact GELU")
    if cfg.family != "llama" and cfg.num_kv_heads != cfg.heads:
        raise UserError(f"model.kv_heads={cfg.kv_heads}: Hugging Face {ARCHITECTURES[cfg.family]} has no "
                        "grouped-query attention; only the llama family can be saved with kv_heads != heads")
    common = {"architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tied, "dtype": dtype, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None}
    if cfg.family == "gpt2":
        return common | {"n_layer": cfg.layers, "n_embd": cfg.d_model, "n_head": cfg.heads, "n_inner": cfg.ffn_dim,
                         "n_positions": cfg.max_len, "layer_norm_epsilon": cfg.norm_eps,
                         "activation_function": GPT2_EXACT_GELU if cfg.activation == "gelu" else "gelu_new",
                         "scale_attn_weights": True,
                         "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if cfg.family == "llama":
        return common | {"num_hidden_layers": cfg.layers, "hidden_size": cfg.d_model,
                         "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.num_kv_heads,
                         "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
                         "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
                         "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                         "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    if cfg.ffn_dim != 4 * cfg.d_model:
        raise UserError(f"model.d_ff={cfg.ffn_dim}: Hugging Face BloomForCausalLM fixes the MLP size to "
                        f"4 x d_model = {4 * cfg.d_model}")
    return common | {"n_layer": cfg.layers, "hidden_size": cfg.d_model, "n_head": cfg.heads,
                     "seq_length": cfg.max_len, "layer_norm_epsilon": cfg.norm_eps,
                     "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0,
                     "attention_dropout": 0.0}


@dataclasses.dataclass(frozen=True)
class View:
    """One jaxllm parameter as a view of one Hugging Face tensor (see the module docstring)."""

    tensor: str  # Hugging Face name, with the base-model prefix
    split: tuple[tuple[int, ...], ...]  # each Hugging Face axis split into these sub-axes
    take: tuple[tuple[int, int], ...] = ()  # (flat sub-axis, index) pairs fixed by this view
    perm: tuple[int, ...] | None = None  # jaxllm axis j is remaining sub-axis perm[j]; None: identity

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(group) for group in self.split)

    @property
    def sub_sizes(self) -> tuple[int, ...]:
        return tuple(n for group in self.split for n in group)

    @property
    def kept(self) -> tuple[int, ...]:
        """Flat sub-axes left after `take`, in Hugging Face order."""
        taken = dict(self.take)
        return tuple(i for i in range(len(self.sub_sizes)) if i not in taken)

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(range(len(self.kept))) if self.perm is None else self.perm

    @property
    def param_shape(self) -> tuple[int, ...]:
        sizes = self.sub_sizes
        return tuple(sizes[self.kept[j]] for j in self.order)


Path = tuple[Any, ...]


def views(cfg: ModelConfig) -> dict[Path, View]:
    """Every jaxllm parameter path -> its Hugging Face view, for this config (unpadded vocabulary)."""
    d, h, kv, e, f, vocab = cfg.d_model, cfg.heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    out: dict[Path, View] = {}
    pre = BASE_PREFIX[cfg.family]
    t = (1, 0)  # a torch Linear weight [out, in] against jaxllm's [in, out]

    def norm(path: Path, name: str, bias: bool = True) -> None:
        out[path + ("scale",)] = View(f"{name}.weight", ((d,),))
        if bias:
            out[path + ("bias",)] = View(f"{name}.bias", ((d,),))

    if cfg.family == "gpt2":
        out[("embed",)] = View(pre + "wte.weight", ((vocab,), (d,)))
        out[("pos_embed",)] = View(pre + "wpe.weight", ((cfg.max_len,), (d,)))
        for i in range(cfg.layers):
            p, b = pre + f"h.{i}.", ("blocks", i)
            norm(b + ("attn_norm",), p + "ln_1")
            for k, name in enumerate("qkv"):
                out[b + ("attn", f"w{name}")] = View(p + "attn.c_attn.weight", ((d,), (3, h, e)), ((1, k),))
                out[b + ("attn", f"b{name}")] = View(p + "attn.c_attn.bias", ((3, h, e),), ((0, k),))
            out[b + ("attn", "wo")] = View(p + "attn.c_proj.weight", ((h, e), (d,)))
            out[b + ("attn", "bo")] = View(p + "attn.c_proj.bias", ((d,),))
            norm(b + ("mlp_norm",), p + "ln_2")
            out[b + ("mlp", "w_in")] = View(p + "mlp.c_fc.weight", ((d,), (f,)))
            out[b + ("mlp", "b_in")] = View(p + "mlp.c_fc.bias", ((f,),))
            out[b + ("mlp", "w_out")] = View(p + "mlp.c_proj.weight", ((f,), (d,)))
            out[b + ("mlp", "b_out")] = View(p + "mlp.c_proj.bias", ((d,),))
        norm(("final_norm",), pre + "ln_f")
    elif cfg.family == "llama":
        out[("embed",)] = View(pre + "embed_tokens.weight", ((vocab,), (d,)))
        for i in range(cfg.layers):
            p, b = pre + f"layers.{i}.", ("blocks", i)
            norm(b + ("attn_norm",), p + "input_layernorm", bias=False)
            out[b + ("attn", "wq")] = View(p + "self_attn.q_proj.weight", ((h, e), (d,)), perm=(2, 0, 1))
            out[b + ("attn", "wk")] = View(p + "self_attn.k_proj.weight", ((kv, e), (d,)), perm=(2, 0, 1))
            out[b + ("attn", "wv")] = View(p + "self_attn.v_proj.weight", ((kv, e), (d,)), perm=(2, 0, 1))
            out[b + ("attn", "wo")] = View(p + "self_attn.o_proj.weight", ((d,), (h, e)), perm=(1, 2, 0))
            norm(b + ("mlp_norm",), p + "post_attention_layernorm", bias=False)
            out[b + ("mlp", "w_gate")] = View(p + "mlp.gate_proj.weight", ((f,), (d,)), perm=t)
            out[b + ("mlp", "w_in")] = View(p + "mlp.up_proj.weight", ((f,), (d,)), perm=t)
            out[b + ("mlp", "w_out")] = View(p + "mlp.down_proj.weight", ((d,), (f,)), perm=t)
        norm(("final_norm",), pre + "norm", bias=False)
    else:
        out[("embed",)] = View(pre + "word_embeddings.weight", ((vocab,), (d,)))
        norm(("embed_norm",), pre + "word_embeddings_layernorm")
        for i in range(cfg.layers):
            p, b = pre + f"h.{i}.", ("blocks", i)
            norm(b + ("attn_norm",), p + "input_layernorm")
            for k, name in enumerate("qkv"):
                out[b + ("attn", f"w{name}")] = View(p + "self_attention.query_key_value.weight",
                                                      ((h, 3, e), (d,)), ((1, k),), perm=(2, 0, 1))
                out[b + ("attn", f"b{name}")] = View(p + "self_attention.query_key_value.bias",
                                                      ((h, 3, e),), ((1, k),))
            out[b + ("attn", "wo")] = View(p + "self_attention.dense.weight", ((d,), (h, e)), perm=(1, 2, 0))
            out[b + ("attn", "bo")] = View(p + "self_attention.dense.bias", ((d,),))
            norm(b + ("mlp_norm",), p + "post_attention_layernorm")
            out[b + ("mlp", "w_in")] = View(p + "mlp.dense_h_to_4h.weight", ((f,), (d,)), perm=t)
            out[b + ("mlp", "b_in")] = View(p + "mlp.dense_h_to_4h.bias", ((f,),))
            out[b + ("mlp", "w_out")] = View(p + "mlp.dense_4h_to_h.weight", ((d,), (f,)), perm=t)
            out[b + ("mlp", "b_out")] = View(p + "mlp.dense_4h_to_h.bias", ((d,),))
        norm(("final_norm",), pre + "ln_f")
    if not cfg.tied:
        out[("head",)] = View("lm_head.weight", ((vocab,), (d,)), perm=t)
    return out


def canonical_name(name: str, family: str) -> str:
    """Adds the base-model prefix that some published files leave out (`h.0.ln_1.weight`)."""
    pre = BASE_PREFIX[family]
    return name if name.startswith(pre) or name.startswith("lm_head.") else pre + name


def is_ignored(name: str, family: str, tied: bool) -> bool:
    """Tensors a checkpoint may carry that hold nothing jaxllm needs (buffers, a tied head's copy)."""
    return name.endswith(IGNORED_SUFFIXES[family]) or (tied and name == "lm_head.weight")
