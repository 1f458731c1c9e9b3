"""Answers from a VisualChat model: KV-cache generation over images and text (`generate_tokens`), batched
greedy or sampled answers to rendered prompts (`answer_questions`), and a training workdir's model read
back (`load_workdir`).

Generation follows `jaxllm.generate`: left-padded prompts, one prefill through `VisualChat.decode`
(images embedded, every cache slot typed so that MMCA tells image keys from text keys), then one text
token per step inside a `lax.while_loop`, using the trainable text embedding for generated tokens, as
training does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import TextTokenizer, load_tokenizer
from jaxllm.engine.checkpoint import Checkpointer, model_config, workdir_step
from jaxllm.engine.state import ParamTree
from jaxllm.errors import UserError
from jaxllm.generate import Generation, Sampling, decode_loop, left_pad
from jaxllm.models.definition import ModelDef
from jaxllm.multimodal import data as data_lib
from jaxllm.multimodal.config import MultimodalConfig, VisionConfig
from jaxllm.multimodal.mmca import TEXT
from jaxllm.multimodal.model import VisualChat, model_def


def generate_tokens(model: VisualChat, tokens: Int[Array, "b p"], token_types: Int[Array, "b p"],
                    images: Float[Array, "b n h w c"], key: PRNGKeyArray, sampling: Sampling) -> Generation:
    """Up to `max_new_tokens` per row after left-padded multimodal prompts; pure and traceable.

    `tokens`/`token_types` are right-aligned prompts (type 0 before each row's prompt, which must
    start with a real slot); image slots take the row's `images` in order. Conventions (stop tokens
    included in the output, `pad_id` after a row's end, log-probs of the raw distribution) are
    those of `jaxllm.generate.generate_tokens`.
    """
    batch, width = tokens.shape
    types = jnp.asarray(token_types, jnp.int32)
    slot_types = jnp.concatenate([types, jnp.full((batch, sampling.max_new_tokens), TEXT, jnp.int32)], axis=1)
    text = jnp.full((batch, 1), TEXT, jnp.int32)
    return decode_loop(
        model, width, jnp.argmax(types != 0, axis=1).astype(jnp.int32),
        lambda model, cache: model.decode(jnp.asarray(tokens, jnp.int32), types, images, cache, slot_types,
                                          last_only=True),
        lambda model, last, cache: model.decode(last, text, None, cache, slot_types), key, sampling)


def make_generator(mdef: ModelDef, sampling: Sampling) -> Callable:
    """A jitted `fn(params, tokens, token_types, images, key) -> Generation` for one model and settings."""

    @jax.jit
    def run(params, tokens, token_types, images, key):
        return generate_tokens(mdef.bind(params), tokens, token_types, images, key, sampling)

    return run


def prompt_arrays(samples: Sequence[data_lib.Sample], vision: VisionConfig, max_images: int, pad_id: int,
                  width: int | None = None, multiple: int = 16) -> dict[str, np.ndarray]:
    """Right-aligned `tokens`, `token_types` (`[b, width]`) and `images` (`[b, max_images, ...]`) of prompts."""
    tokens, _ = left_pad([s.ids for s in samples], pad_id, width, multiple)
    types, _ = left_pad([s.types for s in samples], 0, tokens.shape[1])
    images = np.zeros((len(samples), max_images, *data_lib.image_shape(vision)), np.float32)
    for row, sample in enumerate(samples):
        for i, path in enumerate(sample.images):
            images[row, i] = data_lib.load_image(path, vision)
    return {"tokens": tokens, "token_types": types, "images": images}


def answer_questions(generator: Callable, params: Any, samples: Sequence[data_lib.Sample], tokenizer: TextTokenizer,
                     vision: VisionConfig, max_images: int, max_len: int, max_new_tokens: int, batch_size: int = 32,
                     seed: int = 0) -> list[str]:
    """Generated answer texts (up to EOS, stripped) for prompts ending in "### Answer:\\n"."""
    pad = max(tokenizer.pad_id, 0)
    width = min(-(-max(len(s) for s in samples) // 16) * 16, max_len - max_new_tokens)
    if max(len(s) for s in samples) > width:
        raise UserError(f"a prompt of {max(len(s) for s in samples)} tokens leaves no room for {max_new_tokens} new "
                        f"tokens within the model's max_len={max_len}")
    answers = []
    for begin in range(0, len(samples), batch_size):
        chunk = list(samples[begin:begin + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)  # one compiled shape
        arrays = prompt_arrays(chunk, vision, max_images, pad, width)
        out = generator(params, arrays["tokens"], arrays["token_types"], arrays["images"], jax.random.key(seed + begin))
        ids, lengths = jax.device_get((out.tokens, out.lengths))
        for row in range(real):
            new = [int(t) for t in ids[row, :lengths[row]] if t != tokenizer.eos_id]
            answers.append(tokenizer.decode(new).strip())
    return answers


# ----------------------------------------------------------------------------------------------------
# Loading a training workdir


@dataclasses.dataclass
class Loaded:
    mdef: ModelDef
    params: Any
    model: ModelConfig
    vision: VisionConfig
    multimodal: MultimodalConfig
    max_images: int
    system_prompt: str
    tokenizer: TextTokenizer
    step: int


def load_workdir(workdir: str | Path, mesh: jax.sharding.Mesh, step: int | None = None) -> Loaded:
    """The model, parameters and tokenizer of a `python -m jaxllm.multimodal.train` workdir."""
    workdir = Path(workdir)
    directory, step = workdir_step(workdir, step, "python -m jaxllm.multimodal.train")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        meta = ckpt.read_meta(step)
        if "visualchat" not in meta:
            raise UserError(f"checkpoint {directory / str(step)} is not a VisualChat checkpoint")
        model = dataclasses.replace(model_config(meta["model"]), init_from=None)
        vc = meta["visualchat"]
        vision = VisionConfig(**vc["vision"] | {"init_from": None})
        multimodal = MultimodalConfig(**vc["multimodal"])
        mdef = model_def(model, vision, multimodal)
        groups = vc["state_groups"]  # {"params": [...], "frozen": [...]}
        state = ckpt.restore_part(step, {part: ParamTree.of(mdef).subset(tuple(names)).placed(mesh)
                                         for part, names in groups.items()})
    finally:
        ckpt.close()
    params = {name: value for part in groups for name, value in state[part].items()}
    tokenizer_file = workdir / "data" / vc["tokenizer_file"]
    return Loaded(mdef, params, model, vision, multimodal, int(vc["max_images"]), vc.get("system_prompt", ""),
                  load_tokenizer(tokenizer_file), step)
