"""Compressed decoders as parameter trees: wrapping weights, inner states, layer reduction, sizes.

A compressed model is the ordinary `Decoder` bound to a params dict in which some weights are
`FakeQuantWeight`s or `QuantizedWeight`s (`jaxllm.compression.qtensor`); every matmul and the
embedding lookup go through `jaxllm.ops.linear`, whose weight protocol both implement. So
`ModelDef.bind(compress_params(params, specs, ...))` is the compressed model, for training steps,
evaluation (`jaxllm.losses.lm_loss_sums`) and generation (`jaxllm.generate.generate`) alike.

`forward_states` runs the decoder block by block and returns what distillation compares: the hidden
states (index 0 = embedding output, index i = output of block i - 1), each block's attention
probabilities and the logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm.compression.qtensor import FakeQuantWeight, QuantSpec, is_compressed, quantize_weight
from jaxllm.compression.quantizers import ActRange
from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.models.decoder import Decoder, rotary
from jaxllm.ops.attention import alibi_slopes, attention_mask, attention_weights


def module_path(name: str) -> tuple[Any, ...]:
    """`"blocks.0.attn.wq"` -> `("blocks", 0, "attn", "wq")`."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def get_path(tree: Any, path: Sequence[Any]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Sequence[Any], value: Any) -> dict:
    """A copy of nested dict `tree` with `value` at `path` (only the dicts along the path are copied)."""
    head, *rest = path
    out = dict(tree)
    out[head] = set_path(tree[head], rest, value) if rest else value
    return out


def static_ranges(specs: dict[str, QuantSpec]) -> dict[str, ActRange]:
    """Empty (uncalibrated) ranges for every module with static activation quantization."""
    return {name: ActRange.empty() for name, spec in specs.items() if spec.act_static}


def compress_params(params: dict, specs: dict[str, QuantSpec], *, storage: bool = False,
                    ranges: dict[str, ActRange] | None = None) -> dict:
    """`params` with each planned weight wrapped: `FakeQuantWeight` (default, trainable master weights
    with STE) or, with `storage`, integer `QuantizedWeight`s. `ranges` supplies static activation ranges."""
    ranges = ranges or {}
    for name, spec in specs.items():
        path = module_path(name)
        w = get_path(params, path)
        if is_compressed(w):
            raise ValueError(f"module '{name}' is already compressed")
        act_range = ranges.get(name) if spec.act_static else None
        if spec.act_static and act_range is None:
            raise UserError(f"module '{name}': static activation quantization needs a calibrated range")
        value = quantize_weight(w, spec, act_range) if storage else FakeQuantWeight(w, spec, act_range)
        params = set_path(params, path, value)
    return params


def store_params(params: dict, specs: dict[str, QuantSpec], ranges: dict[str, ActRange] | None = None) -> dict:
    """`compress_params(..., storage=True)` as one compiled program (quantizing module by module
    outside `jit` compiles every small op separately)."""
    return jax.jit(lambda p, r: compress_params(p, specs, storage=True, ranges=r))(params, ranges or {})


def plain_params(tree: Any) -> Any:
    """Every compressed weight replaced by its f32 value (dequantized codes, or the fake-quantized master)."""
    return jax.tree.map(lambda x: x.dequantize() if is_compressed(x) else x, tree, is_leaf=is_compressed)


def weight_bytes(tree: Any) -> int:
    """Bytes of every array in a (possibly compressed) params tree."""
    return sum(int(x.size) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class States(NamedTuple):
    """What a forward pass exposes to distillation (see the module doc)."""

    logits: Float[Array, "b l vocab"]
    hidden: list[Float[Array, "b l d"]]
    attention: list[Float[Array, "b h l l"]]


def attention_probs(block: Any, x: Float[Array, "b l d"], positions: Int[Array, "b l"],
                    segment_ids: Int[Array, "b l"], alibi: Float[Array, " h"] | None) -> Float[Array, "b h l l"]:
    """The softmax attention probabilities of `block` on its input `x` (f32, masked keys at 0).

    The same scores as `jaxllm.ops.attention.causal_attention_reference` (projection through the
    block's possibly compressed weights, RoPE for Llama, ALiBi for BLOOM, causal and segment mask).
    """
    attn = block.attn
    cfg: ModelConfig = attn.cfg
    h = block.attn_norm(x)
    q = attn._project(h, attn.wq, attn.bq)
    k = attn._project(h, attn.wk, attn.bk)
    if cfg.family == "llama":
        q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
    return attention_weights(q, k, attention_mask(segment_ids), positions, alibi, cfg.compute_dtype)


def forward_states(model: Decoder, tokens: Int[Array, "b l"], positions: Int[Array, "b l"] | None = None,
                   segment_ids: Int[Array, "b l"] | None = None, attention: bool = True) -> States:
    """Logits, hidden states and (with `attention`) attention probabilities of every block."""
    cfg = model.cfg
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    alibi = alibi_slopes(cfg.heads) if cfg.family == "bloom" else None
    x = model._embed(tokens, positions)
    hidden, probs = [x], []
    for block in model.blocks:
        if attention:
            probs.append(attention_probs(block, x, positions, segment_ids, alibi))
        x = block(x, positions, segment_ids, alibi)
        hidden.append(x)
    return States(model._logits(x), hidden, probs)


def run_block(model: Decoder, layer: int, x: Float[Array, "b l d"], positions: Int[Array, "b l"],
              segment_ids: Int[Array, "b l"]) -> Float[Array, "b l d"]:
    """Block `layer` of `model` on hidden states `x`."""
    alibi = alibi_slopes(model.cfg.heads) if model.cfg.family == "bloom" else None
    return model.blocks[layer](x, positions, segment_ids, alibi)


def check_teacher_layers(teacher_layers: Sequence[int], num_layers: int,
                         where: str = "teacher_layer") -> tuple[int, ...]:
    layers = tuple(teacher_layers)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise UserError(f"{where}: expected a non-empty list of teacher layer ids, got {list(layers)!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"{where}: layer {bad[0]} does not exist; the teacher has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise UserError(f"{where}: {list(layers)} repeats a layer")
    return layers


def reduce_layers(params: dict, cfg: ModelConfig, teacher_layers: Sequence[int]) -> tuple[dict, ModelConfig]:
    """XTC layer reduction: student block i starts as teacher block `teacher_layers[i]`; embeddings,
    norms and head are copied. Returns the student's params and model config."""
    layers = check_teacher_layers(teacher_layers, cfg.layers, "layer_reduction.teacher_layer")
    student = dict(params)
    student["blocks"] = {i: params["blocks"][t] for i, t in enumerate(layers)}
    return student, dataclasses.replace(cfg, layers=len(layers))


def check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
    """Raises UserError unless the student's logits, hidden states and attention maps can be compared
    with the teacher's (same family, vocabulary, width, heads and length limit)."""
    keys = ("family", "vocab_size", "d_model", "heads", "max_len")
    diffs = [f"model.{k}: teacher {getattr(teacher, k)!r}, student {getattr(student, k)!r}" for k in keys
             if getattr(teacher, k) != getattr(student, k)]
    if diffs:
        raise UserError(f"teacher and student have incompatible shapes ({'; '.join(diffs)}); distillation compares "
                        "their logits, hidden states and attention maps, which need these to match")


def check_same_shapes(teacher: Any, student: Any, where: str) -> None:
    """Raises UserError naming the first parameter whose shape differs between two params trees."""
    t = dict(jax.tree_util.tree_flatten_with_path(teacher)[0])
    s = dict(jax.tree_util.tree_flatten_with_path(student)[0])
    for path in sorted(set(t) | set(s), key=str):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if path not in t or path not in s:
            raise UserError(f"{where}: parameter '{name}' exists in only one of teacher and student")
        if t[path].shape != s[path].shape:
            raise UserError(f"{where}: parameter '{name}' has shape {tuple(t[path].shape)} in the teacher and "
                            f"{tuple(s[path].shape)} in the student")


def evaluate(model_def: Any, tree: Any, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean token cross-entropy and perplexity of a (possibly compressed) params tree over batches."""
    from jaxllm.engine.step import evaluate as evaluate_batches
    from jaxllm.engine.step import make_eval_step
    from jaxllm.losses import lm_loss_sums

    step = make_eval_step(functools.partial(lm_loss_sums, model_def))
    out = evaluate_batches(step, tree, [{k: jnp.asarray(v) for k, v in batch.items()} for batch in batches])
    if not out.get("count"):
        raise UserError("evaluation needs at least one batch with counted tokens")
    return {"eval_loss": out["loss"], "eval_perplexity": float(np.exp(min(out["loss"], 80.0)))}
