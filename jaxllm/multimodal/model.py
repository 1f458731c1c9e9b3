"""The VisualChat model: ViT image encoder -> projection -> any jaxllm decoder, with MMCA.

    image tokens  = LayerNorm(ViT(image) @ W_proj + b_proj)          [images, tokens, d_model]
    text tokens   = text_embed[token ids]                            (a trainable copy of the
                                                                     decoder's input embedding)
    sequence      = text tokens, with each run of image slots filled by the next image's tokens
    logits        = Decoder(sequence, attention = MMCA or causal)

Rows come from `jaxllm.multimodal.data`: `token_types` marks every slot as padding (0), text (1) or
image (2); the image slots of a row are `tokens_per_image` consecutive slots per `<image>`
placeholder, and the k-th run of slots receives image k of the row, in order (DeepSpeed's code pairs
them in reverse; jaxllm follows the conversation's order). The decoder's own embedding table stays
the (tied) output head; only the copy embeds inputs, as in DeepSpeed-VisualChat, where the
projection and the copy are what trains by default (`MultimodalConfig.trainable`).

Parameters are one pure dict `{"vision", "projection", "decoder", "text_embed"}`; `model_def(...)`
gives the `jaxllm.models.definition.ModelDef` that rebuilds the module from it inside `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm.config import ModelConfig
from jaxllm.models.decoder import Decoder, KVCache, Norm, init_param, zeros_param
from jaxllm.models.definition import ModelDef
from jaxllm.multimodal.config import MultimodalConfig, VisionConfig
from jaxllm.multimodal.mmca import IMAGE, PAD, mmca_cached_override, mmca_override
from jaxllm.multimodal.vit import ViT
from jaxllm.ops.matmul import matmul


class Projection(nnx.Module):
    """DeepSpeed-VisualChat's "baseline" projection: Linear(vision d -> language d) then LayerNorm."""

    def __init__(self, d_in: int, d_out: int, eps: float, rngs: nnx.Rngs, init_std: float = 0.02):
        self.w = init_param(rngs, (d_in, d_out), (None, "embed"), init_std)
        self.b = zeros_param((d_out,), ("embed",))
        self.norm = Norm(d_out, False, eps, rngs)

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        return self.norm(matmul(x, self.w[...], dtype) + self.b[...])


class VisualChat(nnx.Module):
    def __init__(self, model: ModelConfig, vision: VisionConfig, multimodal: MultimodalConfig, *, rngs: nnx.Rngs):
        self.cfg, self.vision_cfg, self.mm_cfg = model, vision, multimodal
        self.vision = ViT(vision, rngs, model.compute_dtype)
        self.projection = Projection(vision.d_model, model.d_model, multimodal.projection_eps, rngs, model.init_std)
        self.decoder = Decoder(model, rngs=rngs)
        self.text_embed = nnx.Param(jnp.array(self.decoder.embed[...]), logical_axes=("vocab", "embed"))

    @property
    def tokens_per_image(self) -> int:
        return self.vision_cfg.tokens

    def image_tokens(self, images: Float[Array, "b n h w c"]) -> Float[Array, "b nt d"]:
        """Projected tokens of every image slot, image after image: `[b, n * tokens_per_image, d_model]`."""
        batch, count = images.shape[:2]
        feats = self.vision(images.reshape(batch * count, *images.shape[2:]))
        out = self.projection(feats, self.cfg.compute_dtype)
        return out.reshape(batch, count * out.shape[1], out.shape[2])

    def embed(self, tokens: Int[Array, "b l"], token_types: Int[Array, "b l"],
              images: Float[Array, "b n h w c"]) -> Float[Array, "b l d"]:
        """Input embeddings: the text copy at text slots, image tokens (in order) at image slots, 0 at padding.

        The j-th image slot of a row (counting from its first) takes token j of the concatenated
        image tokens, i.e. token j % T of image j // T, so placeholders are filled in order.
        """
        text = jnp.take(self.text_embed[...], tokens, axis=0)
        is_image = token_types == IMAGE
        pictures = self.image_tokens(images)
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, pictures.shape[1] - 1)
        gathered = jnp.take_along_axis(pictures, slot[..., None], axis=1)
        x = jnp.where(is_image[..., None], gathered, text)
        return jnp.where((token_types == PAD)[..., None], 0.0, x)

    def attention(self, token_types: Int[Array, "b l"]):
        return mmca_override(token_types) if self.mm_cfg.attention == "mmca" else None

    def __call__(self, tokens: Int[Array, "b l"], token_types: Int[Array, "b l"], images: Float[Array, "b n h w c"],
                 positions: Int[Array, "b l"] | None = None) -> Float[Array, "b l vocab"]:
        """Next-token logits `[b, l, vocab]` (f32) of right-padded rows."""
        x = self.embed(tokens, token_types, images)
        segment_ids = (token_types != PAD).astype(jnp.int32)
        return self.decoder(None, positions, segment_ids, embeddings=x, attention=self.attention(token_types))

    def decode(self, tokens: Int[Array, "b t"], token_types: Int[Array, "b t"],
               images: Float[Array, "b n h w c"] | None, cache: KVCache, slot_types: Int[Array, "b s"], *,
               last_only: bool = False) -> tuple[Float[Array, "b t vocab"], KVCache]:
        """`Decoder.decode` for `t` new slots (a left-padded prompt with its images, or generated text).

        `slot_types` holds the type of every cache slot (prompt types, then 1 for generated text),
        which MMCA needs to tell image keys from text keys. `images` may be None when no new slot is
        an image (every generation step after the prefill).
        """
        if images is None:
            x = jnp.take(self.text_embed[...], tokens, axis=0)
        else:
            x = self.embed(tokens, token_types, images)
        attention = mmca_cached_override(slot_types) if self.mm_cfg.attention == "mmca" else None
        return self.decoder.decode(None, cache, last_only=last_only, embeddings=x, attention=attention)


def model_def(model: ModelConfig, vision: VisionConfig, multimodal: MultimodalConfig) -> ModelDef:
    """The graph, parameter template, logical axes and shapes of a VisualChat model (nothing allocated)."""
    return ModelDef.from_module(lambda: VisualChat(model, vision, multimodal, rngs=nnx.Rngs(0)))


def init_params(model: ModelConfig, vision: VisionConfig, multimodal: MultimodalConfig, seed: int) -> dict:
    """A fresh parameter dict (the text embedding starts as a copy of the decoder's)."""
    module = VisualChat(model, vision, multimodal, rngs=nnx.Rngs(params=seed))
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))
