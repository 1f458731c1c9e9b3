"""A CLIP-style Vision Transformer, and loading its weights from a Hugging Face CLIP checkpoint.

Images `[batch, height, width, channels]` (normalised pixels) -> tokens `[batch, 1 + patches, d]`:

    x = [class; patches @ W_patch] + pos            (W_patch: the k x k stride-k convolution, no bias)
    x = LayerNorm_pre(x)
    x = x + Attn(LN1(x));  x = x + MLP(LN2(x))      (each block; bidirectional attention, biased
                                                    projections, MLP d -> d_ff -> d with quick-GELU
                                                    x * sigmoid(1.702 x) for CLIP)

which is Hugging Face `CLIPVisionModel`'s `last_hidden_state` (Radford et al., 2021, "Learning
Transferable Visual Models From Natural Language Supervision"); DeepSpeed-VisualChat feeds those
tokens to its projection. `post_norm` (CLIP's `post_layernorm`) only serves the pooled class output
`ViT.pooled`, kept so that a loaded checkpoint round-trips completely.

`load_clip_vision(path)` reads a `CLIPVisionModel` or `CLIPModel` directory (config.json +
safetensors; pickle files are refused, as in `jaxllm.interop.hf_io`) into this module's parameter tree.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from jaxllm.errors import UserError
from jaxllm.interop import hf_io
from jaxllm.models.decoder import Norm, init_param, zeros_param
from jaxllm.multimodal.config import VisionConfig
from jaxllm.ops.attention import grouped_mix, grouped_scores
from jaxllm.ops.matmul import matmul


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown vision activation {name!r}")


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.heads
        hd = d // h
        self.wq = init_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk = init_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wv = init_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wo = init_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg.init_std / math.sqrt(2 * cfg.layers))
        self.bq, self.bk, self.bv = (zeros_param((h, hd), ("heads", "head_dim")) for _ in range(3))
        self.bo = zeros_param((d,), ("embed",))

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        def project(w, b):
            d, h, hd = w.shape
            return matmul(x, w[...].reshape(d, h * hd), dtype).reshape(*x.shape[:-1], h, hd) + b[...]

        q, k, v = project(self.wq, self.bq), project(self.wk, self.bk), project(self.wv, self.bv)
        out = grouped_mix(jax.nn.softmax(grouped_scores(q, k, dtype), axis=-1), v, dtype)  # every token sees all
        batch, length, heads, hd = out.shape
        return matmul(out.reshape(batch, length, heads * hd), self.wo[...].reshape(heads * hd, -1), dtype) + \
            self.bo[...]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.act = cfg.act
        self.norm1 = Norm(cfg.d_model, False, cfg.norm_eps, rngs)
        self.attn = VisionAttention(cfg, rngs)
        self.norm2 = Norm(cfg.d_model, False, cfg.norm_eps, rngs)
        self.w_in = init_param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std)
        self.b_in = zeros_param((cfg.d_ff,), ("mlp",))
        self.w_out = init_param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"),
                                cfg.init_std / math.sqrt(2 * cfg.layers))
        self.b_out = zeros_param((cfg.d_model,), ("embed",))

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        x = x + self.attn(self.norm1(x), dtype)
        h = activation(self.act, matmul(self.norm2(x), self.w_in[...], dtype) + self.b_in[...])
        return x + matmul(h, self.w_out[...], dtype) + self.b_out[...]


class ViT(nnx.Module):
    """CLIP vision tower: `[b, H, W, C]` pixels -> `[b, tokens, d]` (see the module docstring)."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs, compute_dtype: str = "float32"):
        self.cfg, self.compute_dtype = cfg, compute_dtype
        d, p, c = cfg.d_model, cfg.patch_size, cfg.channels
        self.patch_embed = init_param(rngs, (c * p * p, d), (None, "embed"), cfg.init_std)  # rows ordered (c, y, x)
        self.class_embed = init_param(rngs, (d,), ("embed",), cfg.init_std)
        self.pos_embed = init_param(rngs, (cfg.grid**2 + 1, d), ("positions", "embed"), cfg.init_std)
        self.pre_norm = Norm(d, False, cfg.norm_eps, rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs) for _ in range(cfg.layers)])
        self.post_norm = Norm(d, False, cfg.norm_eps, rngs)

    def hidden(self, images: Float[Array, "b h w c"]) -> Float[Array, "b n d"]:
        """The last hidden state, class token first: `[b, 1 + grid^2, d]` f32."""
        cfg, dtype = self.cfg, self.compute_dtype
        batch, height, width, channels = images.shape
        if (height, width, channels) != (cfg.image_size, cfg.image_size, cfg.channels):
            raise ValueError(f"images of shape {images.shape[1:]}; the vision encoder expects "
                             f"({cfg.image_size}, {cfg.image_size}, {cfg.channels})")
        g, p = cfg.grid, cfg.patch_size
        patches = images.reshape(batch, g, p, g, p, channels).transpose(0, 1, 3, 5, 2, 4)
        x = matmul(patches.reshape(batch, g * g, channels * p * p).astype(jnp.float32), self.patch_embed[...], dtype)
        cls = jnp.broadcast_to(self.class_embed[...], (batch, 1, cfg.d_model))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...][None]
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x, dtype)
        return x

    def __call__(self, images: Float[Array, "b h w c"]) -> Float[Array, "b t d"]:
        """The image tokens the language model sees (`hidden`, without the class token unless kept)."""
        x = self.hidden(images)
        return x if self.cfg.keep_class_token else x[:, 1:]

    def pooled(self, images: Float[Array, "b h w c"]) -> Float[Array, "b d"]:
        """CLIP's pooled output: the post-LayerNorm of the class token."""
        return self.post_norm(self.hidden(images)[:, 0])


# ---------------------------------------------------------------------------------------------------
# Hugging Face CLIP checkpoints

PREFIX = "vision_model."
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _hf_vision_config(path: Path) -> dict[str, Any]:
    file, config = path / hf_io.CONFIG, hf_io.read_config(path, "CLIP checkpoint")
    if config.get("model_type") == "clip" or "vision_config" in config:
        config = config.get("vision_config") or {}
    if config.get("model_type") not in (None, "clip_vision_model"):
        raise UserError(f"'{file}': model_type {config.get('model_type')!r} is not a CLIP vision model "
                        "(expected 'clip_vision_model', or 'clip' with a vision_config)")
    return config


def vision_config_from_hf(path: str | Path, base: VisionConfig | None = None) -> VisionConfig:
    """The `VisionConfig` of a Hugging Face CLIP directory; non-architecture keys come from `base`."""
    path = Path(path)
    hf = _hf_vision_config(path)
    act = hf.get("hidden_act", "quick_gelu")
    if act not in _ACTS:
        raise UserError(f"'{path / hf_io.CONFIG}': hidden_act {act!r} is not supported (one of {', '.join(_ACTS)})")
    base = base or VisionConfig()
    cfg = VisionConfig(
        image_size=int(hf.get("image_size", 224)), patch_size=int(hf.get("patch_size", 32)),
        channels=int(hf.get("num_channels", 3)), d_model=int(hf.get("hidden_size", 768)),
        layers=int(hf.get("num_hidden_layers", 12)), heads=int(hf.get("num_attention_heads", 12)),
        d_ff=int(hf.get("intermediate_size", 3072)), act=_ACTS[act], norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        init_std=base.init_std, init_from=str(path), keep_class_token=base.keep_class_token,
        image_mean=list(base.image_mean), image_std=list(base.image_std))
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():  # the normalisation the encoder was trained with
        try:
            pre = json.loads(preprocessor.read_text())
            cfg.image_mean, cfg.image_std = list(pre.get("image_mean", cfg.image_mean)), list(
                pre.get("image_std", cfg.image_std))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            raise UserError(f"'{preprocessor}' is not valid JSON with image_mean/image_std lists") from None
    cfg.validate()
    return cfg


def _expected(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, f, c, p = cfg.d_model, cfg.d_ff, cfg.channels, cfg.patch_size
    shapes = {"embeddings.class_embedding": (d,), "embeddings.patch_embedding.weight": (d, c, p, p),
              "embeddings.position_embedding.weight": (cfg.grid**2 + 1, d)}
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes |= {f"{norm}.weight": (d,), f"{norm}.bias": (d,)}
    for i in range(cfg.layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{layer}self_attn.{proj}.weight": (d, d), f"{layer}self_attn.{proj}.bias": (d,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}{norm}.weight": (d,), f"{layer}{norm}.bias": (d,)}
        shapes |= {f"{layer}mlp.fc1.weight": (f, d), f"{layer}mlp.fc1.bias": (f,),
                   f"{layer}mlp.fc2.weight": (d, f), f"{layer}mlp.fc2.bias": (d,)}
    return shapes


def _canonical(files: dict[str, tuple[Path, str]]) -> dict[str, tuple[Path, str]]:
    """Names without the `vision_model.` prefix, which CLIPModel (and older CLIPVisionModel) files carry."""
    out = {name: where for name, where in files.items() if not name.startswith(PREFIX)}
    out |= {name[len(PREFIX):]: where for name, where in files.items() if name.startswith(PREFIX)}
    return out


def load_clip_vision(path: str | Path, cfg: VisionConfig | None = None) -> tuple[VisionConfig, dict[str, Any]]:
    """`(config, params)`: a Hugging Face CLIP vision tower as this module's f32 numpy parameter tree.

    Checks every tensor's presence, shape and dtype against config.json before converting; tensors
    outside the vision tower (a CLIPModel's text tower and projections) are ignored; names may carry
    the `vision_model.` prefix (CLIPModel, older CLIPVisionModel files) or not (transformers 5). Linear weights are
    stored `[out, in]` by PyTorch and transposed here; the patch convolution `[d, c, k, k]` becomes
    `[c * k * k, d]` with rows ordered (channel, y, x).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"CLIP checkpoint '{path}' is not a directory")
    cfg = vision_config_from_hf(path, cfg)
    files = _canonical(hf_io.tensor_files(path, "CLIP checkpoint"))
    expected = _expected(cfg)
    tensors: dict[str, np.ndarray] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name, shape in expected.items():
            if name not in files:
                raise UserError(f"CLIP checkpoint '{path}': tensor '{name}' is missing")
            file, stored = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(hf_io.open_safetensors(file))
            sl = handles[file].get_slice(stored)
            hf_io.check_tensor(file, stored, tuple(sl.get_shape()), sl.get_dtype(), shape)
            tensors[name] = np.asarray(sl[:]).astype(np.float32)

    d, h = cfg.d_model, cfg.heads
    hd = d // h

    def t(name):
        return tensors[name]

    def norm(name):
        return {"scale": t(f"{name}.weight"), "bias": t(f"{name}.bias")}

    blocks = {}
    for i in range(cfg.layers):
        layer = f"encoder.layers.{i}."
        attn = {}
        for key, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            attn[f"w{key}"] = t(f"{layer}self_attn.{proj}.weight").T.reshape(d, h, hd)
            attn[f"b{key}"] = t(f"{layer}self_attn.{proj}.bias").reshape(h, hd)
        attn["wo"] = t(f"{layer}self_attn.out_proj.weight").T.reshape(h, hd, d)
        attn["bo"] = t(f"{layer}self_attn.out_proj.bias")
        blocks[i] = {"norm1": norm(f"{layer}layer_norm1"), "attn": attn, "norm2": norm(f"{layer}layer_norm2"),
                     "w_in": t(f"{layer}mlp.fc1.weight").T, "b_in": t(f"{layer}mlp.fc1.bias"),
                     "w_out": t(f"{layer}mlp.fc2.weight").T, "b_out": t(f"{layer}mlp.fc2.bias")}
    params = {
        "patch_embed": t("embeddings.patch_embedding.weight").reshape(d, -1).T,
        "class_embed": t("embeddings.class_embedding"),
        "pos_embed": t("embeddings.position_embedding.weight"),
        "pre_norm": norm("pre_layrnorm"),
        "blocks": blocks,
        "post_norm": norm("post_layernorm"),
    }
    return cfg, jax.tree.map(np.ascontiguousarray, params)
