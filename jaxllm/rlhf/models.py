"""The RLHF models: the actor is the plain `Decoder`; the reward model and the critic are a `ValueModel`,
the decoder with a value head in place of the language-model head (DeepSpeed-Chat's `RewardModel`:
`v_head = Linear(hidden, 1, bias=False)` on the final hidden states, one value per token).

Parameter trees are pure dicts, so checkpoints stay plain: a value model's params are
`{"decoder": <Decoder params>, "value_head": [d_model]}`, and the decoder part loads from any
`jaxllm.train` or step-1 checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm.config import ModelConfig
from jaxllm.interop.hf import PaddedVocabDecoder
from jaxllm.models.decoder import Decoder
from jaxllm.models.definition import ModelDef

VALUE_HEAD = "value_head"


def actor_def(cfg: ModelConfig, tokenizer_vocab: int | None = None) -> ModelDef:
    """The actor's `ModelDef`. When the tokenizer has fewer ids than the embedding has rows (a padded
    vocabulary), the extra ids get probability 0 so that sampling never produces them."""
    if tokenizer_vocab is None or tokenizer_vocab >= cfg.vocab_size:
        return ModelDef.from_config(cfg)
    return ModelDef.from_module(lambda: PaddedVocabDecoder(cfg, tokenizer_vocab, rngs=nnx.Rngs(0)))


class HiddenDecoder(Decoder):
    """A `Decoder` that stops before the language-model head: its output is the final (normalised)
    hidden state `[batch, length, d_model]`, in f32. Same parameters as `Decoder`."""

    def _logits(self, x):
        return self.final_norm(x)


class ValueModel(nnx.Module):
    """Token ids -> one scalar per token: `final_hidden[b, t] . value_head`, in f32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.decoder = HiddenDecoder(cfg, rngs=rngs)
        std = cfg.init_std
        self.value_head = nnx.Param(std * jax.random.normal(rngs.params(), (cfg.d_model,)), logical_axes=("embed",))

    def __call__(
        self,
        tokens: Int[Array, "b l"],
        positions: Int[Array, "b l"] | None = None,
        segment_ids: Int[Array, "b l"] | None = None,
    ) -> Float[Array, "b l"]:
        hidden = self.decoder(tokens, positions, segment_ids).astype(jnp.float32)
        return hidden @ self.value_head[...]


def value_def(cfg: ModelConfig) -> ModelDef:
    return ModelDef.from_module(lambda: ValueModel(cfg, rngs=nnx.Rngs(0)))


def init_value_params(cfg: ModelConfig, seed: int) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(ValueModel(cfg, rngs=nnx.Rngs(params=seed)), nnx.Param))


def right_padded_inputs(lengths: Int[Array, " b"], width: int) -> tuple[Int[Array, "b l"], Int[Array, "b l"]]:
    """(positions, segment_ids) of right-padded rows: positions 0.., segment 1 on real tokens, 0 after."""
    t = jnp.arange(width, dtype=jnp.int32)[None, :]
    real = t < lengths[:, None]
    return jnp.where(real, t, 0), real.astype(jnp.int32)


def sequence_inputs(
    prompt_lengths: Int[Array, " b"], answer_lengths: Int[Array, " b"], prompt_width: int, width: int
) -> tuple[Int[Array, "b l"], Int[Array, "b l"]]:
    """(positions, segment_ids) of step-3 sequences: a prompt left-padded to `prompt_width`, then the
    answer right-padded. Real tokens count positions from 0 at the prompt's first token."""
    t = jnp.arange(width, dtype=jnp.int32)[None, :]
    first = prompt_width - prompt_lengths[:, None]
    real = (t >= first) & (t < prompt_width + answer_lengths[:, None])
    return jnp.where(real, t - first, 0), real.astype(jnp.int32)
