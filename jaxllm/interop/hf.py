"""Hugging Face GPT-2, Llama and BLOOM checkpoints in and out of jaxllm.

    model, config = jaxllm.interop.hf.load("path/to/hf_dir")   # config.json + safetensors
    logits = model(tokens)                                      # [batch, seq, vocab], f32
    jaxllm.interop.hf.save(model, config, "path/to/out_dir")    # AutoModelForCausalLM loads it

Loading reads only safetensors (never pickle, never code from the checkpoint) and streams: every
parameter is built with `jax.make_array_from_callback`, so each device reads just its own slice of
each tensor from the memory-mapped files and no process holds a full host copy of the model. The
name and layout tables (GPT-2's Conv1D `[in, out]` weights and fused `c_attn`, BLOOM's per-head fused
`query_key_value`, Llama's grouped-query projections) live in `jaxllm.interop.hf_layouts`; file
validation, block reads and atomic writes in `jaxllm.interop.hf_io`.

Vocabulary padding: `load(..., pad_vocab_multiple=128)` pads the embedding (and untied head) with
zero rows up to a multiple, e.g. so the vocabulary splits evenly over a tensor-parallel axis. The
returned model is a `PaddedVocabDecoder` that sets the logits of the padded ids to the float32
minimum, so softmax gives them probability exactly 0 and argmax, top-k and top-p never pick them.
The returned config keeps the checkpoint's vocabulary size, and `save` trims the tables back to it.

Saving writes into a temporary directory beside the target and renames it into place once every
file is complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh, SingleDeviceSharding
from jaxtyping import Array, Float

from jaxllm import mesh as mesh_lib
from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import hugging_face_files
from jaxllm.errors import UserError
from jaxllm.interop import hf_io as io
from jaxllm.interop import hf_layouts as layouts
from jaxllm.interop.hf_io import INDEX, HFCheckpoint
from jaxllm.models.decoder import Decoder
from jaxllm.models.definition import ModelDef

# ---------------------------------------------------------------------------------------------
# Padded vocabularies


def mask_padded_vocab(logits: Float[Array, "... vocab"], vocab_size: int) -> Float[Array, "... vocab"]:
    """Sets logits of ids >= `vocab_size` to the float32 minimum: probability 0, never the argmax."""
    real = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(real, logits, jnp.finfo(logits.dtype).min)


class PaddedVocabDecoder(Decoder):
    """A `Decoder` whose vocabulary tables are padded past `unpadded_vocab` real ids.

    `cfg.vocab_size` is the padded size (the table shapes); the logits of padded ids are masked with
    `mask_padded_vocab`, so `logits[..., :unpadded_vocab]` equals the unpadded model's logits and the
    rest can never win a softmax, argmax or sampling step.
    """

    def __init__(self, cfg: ModelConfig, unpadded_vocab: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.unpadded_vocab = unpadded_vocab

    def _logits(self, x):  # the one head both `__call__` and `decode` go through
        return mask_padded_vocab(super()._logits(x), self.unpadded_vocab)


def padded_vocab_size(vocab_size: int, multiple: int | None) -> int:
    if multiple is None:
        return vocab_size
    if not isinstance(multiple, int) or multiple <= 0:
        raise UserError(f"pad_vocab_multiple: got {multiple!r}; expected a positive integer or None")
    return -(-vocab_size // multiple) * multiple


def _stream(ckpt: HFCheckpoint, views: dict, shapes: dict, shardings: dict) -> dict:
    """Builds every parameter straight into its shards; returns the params pure dict."""
    params: dict = {}  # flat: path -> array
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_shardings = traverse_util.flatten_dict(shardings)
    with ckpt.readers() as read:
        for path, shape in flat_shapes.items():
            view = views[path]
            cache: dict[tuple, np.ndarray] = {}  # replicas of the same block are read once

            def callback(index, view=view, shape=shape, cache=cache):
                key = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
                if key not in cache:
                    cache[key] = io.read_block(view, read, index, shape)
                return cache[key]

            params[path] = jax.make_array_from_callback(shape, flat_shardings[path], callback)
    return traverse_util.unflatten_dict(params)


def _param_shardings(model_def: ModelDef, mesh: Mesh | None, zero_stage: int) -> dict:
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, model_def.shapes, is_leaf=lambda x: isinstance(x, tuple))
    return mesh_lib.tree_shardings(mesh, model_def.logical_axes, model_def.shapes, mesh_lib.param_drop(zero_stage))


# ---------------------------------------------------------------------------------------------
# Public API


def model_config(path: str | os.PathLike, max_len: int | None = None, compute_dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` for a Hugging Face directory's config.json (no weights are read)."""
    return HFCheckpoint(path).model_config(max_len, compute_dtype)


def load(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    zero_stage: int = 3,
    pad_vocab_multiple: int | None = None,
    max_len: int | None = None,
    compute_dtype: str = "float32",
) -> tuple[Decoder, ModelConfig]:
    """Reads a local Hugging Face GPT-2, Llama or BLOOM directory into a jaxllm `Decoder`.

    Args:
      path: a directory with `config.json` and `model.safetensors` or a sharded
        `model.safetensors.index.json` set.
      mesh: place parameters on this mesh with jaxllm's layout (`jaxllm.mesh.LOGICAL_RULES`); each
        device reads only its own slice. None: everything on the first device.
      zero_stage: with a mesh, stage 3 also shards parameters over `fsdp` (as in training).
      pad_vocab_multiple: pad the vocabulary tables up to a multiple of this (see the module doc).
      max_len: longest sequence for Llama/BLOOM (default: the config's, else 2048).
      compute_dtype: "float32" or "bfloat16" matmul inputs; parameters are always f32.

    Returns:
      `(model, config)`: `model(tokens)` gives f32 logits `[batch, seq, vocab]` (vocab padded when
      asked); `config.vocab_size` is the checkpoint's own vocabulary size.

    Example:
      >>> model, cfg = load("tiny-llama")                      # doctest: +SKIP
      >>> model(jnp.zeros((1, 8), jnp.int32)).shape            # doctest: +SKIP
      (1, 8, 256)
    """
    ckpt = HFCheckpoint(path)
    cfg = ckpt.model_config(max_len, compute_dtype)
    views = ckpt.check(cfg)
    vocab = padded_vocab_size(cfg.vocab_size, pad_vocab_multiple)
    table_cfg = dataclasses.replace(cfg, vocab_size=vocab)
    model_def = ModelDef.from_config(table_cfg)
    params = _stream(ckpt, views, model_def.shapes, _param_shardings(model_def, mesh, zero_stage))
    if vocab == cfg.vocab_size:
        return model_def.bind(params), cfg
    abstract = nnx.eval_shape(lambda: PaddedVocabDecoder(table_cfg, cfg.vocab_size, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), cfg


ARCHITECTURE_FIELDS = ("family", "layers", "d_model", "heads", "num_kv_heads", "ffn_dim", "vocab_size", "tied",
                       "norm_eps", "activation")


def resolve_model_config(user: ModelConfig, path: str | os.PathLike) -> ModelConfig:
    """The training model config for `model.init_from=path`: the checkpoint fixes the architecture.

    Each architecture key the user left at its default takes the checkpoint's value; a key set to a
    different value is a UserError naming both. `max_len` (for Llama and BLOOM, whose weights do not
    fix it), `compute_dtype`, `remat`, `attention_implementation` and `init_std` stay the user's.
    """
    ckpt = HFCheckpoint(path)
    default = ModelConfig()
    user_max_len = None if ckpt.family == "gpt2" or user.max_len == default.max_len else user.max_len
    hf = ckpt.model_config(user_max_len, user.compute_dtype)
    fields = ARCHITECTURE_FIELDS + (("rope_theta",) if hf.family == "llama" else ())
    if hf.family == "gpt2":
        fields += ("max_len",)
    key_names = {"num_kv_heads": "kv_heads", "ffn_dim": "d_ff", "tied": "tie_embeddings"}
    for name in fields:
        key = key_names.get(name, name)
        user_raw = getattr(user, key)
        if user_raw == getattr(default, key):
            continue  # left at its default: the checkpoint decides
        mine, theirs = getattr(user, name), getattr(hf, name)
        if mine != theirs:
            raise UserError(f"config key 'model.{key}': got {mine!r}, but model.init_from checkpoint "
                            f"'{ckpt.config_file}' has {theirs!r}; remove the key or set it to {theirs!r}")
    return dataclasses.replace(hf, remat=user.remat, init_std=user.init_std, init_from=user.init_from,
                               attention_implementation=user.attention_implementation)


def resolve_init_from(config: Any) -> Any:
    """A run config whose `model.init_from` names a Hugging Face directory, with its config.json filling
    the model section (see `resolve_model_config`); unchanged without `init_from`."""
    if not config.model.init_from:
        return config
    model = resolve_model_config(config.model, config.model.init_from)
    return dataclasses.replace(config, model=model).validate()


def load_params(path: str | os.PathLike, cfg: ModelConfig, shardings: Any) -> dict:
    """The params pure dict for training `cfg` (which must match the checkpoint), built in `shardings`."""
    ckpt = HFCheckpoint(path)
    hf_cfg = ckpt.model_config(cfg.max_len if cfg.family != "gpt2" else None)
    for name in ARCHITECTURE_FIELDS:
        if getattr(hf_cfg, name) != getattr(cfg, name):
            raise UserError(f"model {name}={getattr(cfg, name)!r} differs from checkpoint '{ckpt.config_file}' "
                            f"({getattr(hf_cfg, name)!r})")
    views = ckpt.check(hf_cfg)
    model_def = ModelDef.from_config(cfg)
    return _stream(ckpt, views, model_def.shapes, shardings)


def _hf_tensors(params: dict, cfg: ModelConfig, dtype) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
    """(name, build, nbytes) for each Hugging Face tensor, assembling fused tensors from their views."""
    flat = traverse_util.flatten_dict(params)
    views = layouts.views(cfg)
    missing = [p for p in views if p not in flat]
    extra = [p for p in flat if p not in views]
    if missing or extra:
        bad = missing[0] if missing else extra[0]
        what = "is missing" if missing else "is not part of the configured model"
        raise UserError(f"parameter '{'/'.join(map(str, bad))}' {what} (model config: {cfg.family}, "
                        f"{cfg.layers} layers, tie_embeddings={cfg.tied})")
    by_tensor: dict[str, list[tuple[tuple, layouts.View]]] = {}
    for path, view in views.items():
        want, got = view.param_shape, tuple(flat[path].shape)
        vocab_axis = {("embed",): 0, ("head",): 1}.get(path)  # may be padded past config.vocab_size
        if len(got) != len(want) or not all(g == w or (j == vocab_axis and g > w)
                                            for j, (g, w) in enumerate(zip(got, want, strict=True))):
            raise UserError(f"parameter '{'/'.join(map(str, path))}' has shape {list(got)}; the model config "
                            f"implies {list(want)}")
        by_tensor.setdefault(view.tensor, []).append((path, view))
    itemsize = np.dtype(dtype).itemsize
    for name, parts in by_tensor.items():
        view0 = parts[0][1]

        def build(parts=parts, view0=view0) -> np.ndarray:
            full = np.zeros(view0.sub_sizes, np.float32)
            for path, view in parts:
                value = np.asarray(jax.device_get(flat[path]), np.float32)
                value = value[tuple(slice(0, n) for n in view.param_shape)]  # drop vocabulary padding
                index: list[Any] = [slice(None)] * len(view.sub_sizes)
                for axis, k in view.take:
                    index[axis] = k
                full[tuple(index)] = value.transpose(np.argsort(view.order))
            return full.reshape(view0.hf_shape).astype(dtype)

        yield name, build, math.prod(view0.hf_shape) * itemsize


def save(
    model: Decoder | dict,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    extra_config: dict[str, Any] | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Writes `model` as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
      model: a jaxllm `Decoder`, or its parameters as a pure dict (a checkpoint's `params`); they may be
        sharded: each tensor is gathered in turn.
      config: the model's config; `config.vocab_size` is the vocabulary written (tables padded past
        it, e.g. by `load(..., pad_vocab_multiple=...)`, are trimmed back).
      path: the directory to create.
      dtype: "float32", "bfloat16" or "float16" tensors on disk.
      max_shard_size: bytes (or "5GB", "500MiB") per safetensors file; larger models are split into
        `model-0000i-of-0000n.safetensors` files with a `model.safetensors.index.json`.
      overwrite: replace an existing non-empty directory (only once the new one is complete).
      extra_config: more config.json fields, e.g. `{"bos_token_id": 1, "eos_token_id": 2}`.
      tokenizer: a SentencePiece `.model`, a `tokenizer.json` or a directory holding one, written beside
        the weights with a `tokenizer_config.json`
        (`jaxllm.data.tokenizer.hugging_face_files`); its BOS/EOS/PAD ids fill config.json's
        `bos_token_id`, `eos_token_id` and `pad_token_id` (`extra_config` still wins).

    Returns the directory. Nothing is left at `path` (or beside it) if any step fails. Files get the
    mode of any new file (0644 under the usual umask).
    """
    if dtype not in io.SAVE_DTYPES:
        raise UserError(f"dtype: got {dtype!r}; expected one of {', '.join(io.SAVE_DTYPES)}")
    if isinstance(model, PaddedVocabDecoder) and config.vocab_size == model.cfg.vocab_size:
        config = dataclasses.replace(config, vocab_size=model.unpadded_vocab)
    params = model if isinstance(model, dict) else nnx.to_pure_dict(nnx.state(model, nnx.Param))
    path = Path(path)
    limit = io.size_bytes(max_shard_size)
    files, special_ids = hugging_face_files(tokenizer, config.max_len) if tokenizer is not None else ({}, {})
    hf_config = layouts.hf_config_from_model(config, dtype) | special_ids | dict(extra_config or {})
    io.check_target(path, overwrite)
    io.write_directory(path, hf_config, list(_hf_tensors(params, config, io.SAVE_DTYPES[dtype])), limit, files)
    return path


__all__ = ["INDEX", "HFCheckpoint", "PaddedVocabDecoder", "load", "load_params", "mask_padded_vocab", "model_config",
           "resolve_init_from", "resolve_model_config", "save"]
