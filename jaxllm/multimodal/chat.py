"""Chat with a trained VisualChat model: KV-cache generation over images and text, and the command.

    python -m jaxllm.multimodal.chat --workdir runs/visualchat --image a.png --image b.png \\
        --question "<image>\\n<image>\\nWhich image has more circles?" [--question "And red shapes?" ...]

Each `--question` is one round; its `<image>` placeholders take the next `--image` files in order
(if the first question has none, one placeholder per image is put in front of it). The answer of
each round is generated greedily (or sampled) and kept in the history, so later rounds see the whole
conversation in DeepSpeed-VisualChat's template. Without `--question`, questions are read from
standard input, one per line.

Generation (`generate_tokens`) follows `jaxllm.generate`: left-padded prompts, one prefill through
`VisualChat.decode` (images embedded, every cache slot typed so that MMCA tells image keys from text
keys), then one text token per step inside a `lax.while_loop`, using the trainable text embedding
for generated tokens, as training does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from jaxllm import mesh as mesh_lib
from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.data.tokenizer import TextTokenizer, load_tokenizer
from jaxllm.engine.checkpoint import Checkpointer
from jaxllm.errors import UserError
from jaxllm.generate import Generation, check_sampling, decode_loop, sampling_settings
from jaxllm.models.definition import ModelDef
from jaxllm.multimodal import data as data_lib
from jaxllm.multimodal.config import MultimodalConfig, VisionConfig
from jaxllm.multimodal.mmca import TEXT
from jaxllm.multimodal.model import VisualChat, model_def


def generate_tokens(
    model: VisualChat,
    tokens: Int[Array, "b p"],
    token_types: Int[Array, "b p"],
    images: Float[Array, "b n h w c"],
    key: PRNGKeyArray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
) -> Generation:
    """Up to `max_new_tokens` per row after left-padded multimodal prompts; pure and traceable.

    `tokens`/`token_types` are right-aligned prompts (type 0 before each row's prompt, which must
    start with a real slot); image slots take the row's `images` in order. Conventions (stop tokens
    included in the output, `pad_id` after a row's end, log-probs of the raw distribution) are
    those of `jaxllm.generate.generate_tokens`.
    """
    batch, width = tokens.shape
    types = jnp.asarray(token_types, jnp.int32)
    slot_types = jnp.concatenate([types, jnp.full((batch, max_new_tokens), TEXT, jnp.int32)], axis=1)
    text = jnp.full((batch, 1), TEXT, jnp.int32)
    return decode_loop(
        model, width, jnp.argmax(types != 0, axis=1).astype(jnp.int32),
        lambda model, cache: model.decode(jnp.asarray(tokens, jnp.int32), types, images, cache, slot_types,
                                          last_only=True),
        lambda model, last, cache: model.decode(last, text, None, cache, slot_types), key,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
        pad_id=pad_id)


def make_generator(mdef: ModelDef, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0) -> Callable:
    """A jitted `fn(params, tokens, token_types, images, key) -> Generation` for one model and settings."""
    settings = sampling_settings(max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id)

    @jax.jit
    def run(params, tokens, token_types, images, key):
        return generate_tokens(mdef.bind(params), tokens, token_types, images, key, **settings)

    return run


def prompt_arrays(samples: Sequence[data_lib.Sample], vision: VisionConfig, max_images: int, pad_id: int,
                  width: int | None = None, multiple: int = 16) -> dict[str, np.ndarray]:
    """Right-aligned `tokens`, `token_types` (`[b, width]`) and `images` (`[b, max_images, ...]`) of prompts."""
    longest = max(len(s) for s in samples)
    width = width or -(-longest // multiple) * multiple
    tokens = np.full((len(samples), width), pad_id, np.int32)
    types = np.zeros((len(samples), width), np.int32)
    images = np.zeros((len(samples), max_images, *data_lib.image_shape(vision)), np.float32)
    for row, sample in enumerate(samples):
        n = len(sample)
        tokens[row, width - n:], types[row, width - n:] = sample.ids, sample.types
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
    directory = workdir / "checkpoints"
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: directory not found")
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise UserError(f"--workdir {workdir}: no checkpoint in {directory}; train first with "
                        f"python -m jaxllm.multimodal.train --workdir {workdir}")
    if step is not None and step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {directory}; found steps {steps}")
    step = steps[-1] if step is None else step
    ckpt = Checkpointer(directory, async_save=False)
    try:
        meta = ckpt.read_meta(step)
        if "visualchat" not in meta:
            raise UserError(f"checkpoint {directory / str(step)} is not a VisualChat checkpoint")
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        model = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known} | {"init_from": None})
        vc = meta["visualchat"]
        vision = VisionConfig(**vc["vision"] | {"init_from": None})
        multimodal = MultimodalConfig(**vc["multimodal"])
        mdef = model_def(model, vision, multimodal)
        groups = vc["state_groups"]  # {"params": [...], "frozen": [...]}
        restore_tree = {}
        for part, names in groups.items():
            restore_tree[part] = {name: jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh), mdef.shapes[name],
                mesh_lib.tree_shardings(mesh, mdef.logical_axes[name], mdef.shapes[name]),
                is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)) for name in names}
        restore = ocp.args.PyTreeRestore(item=restore_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(
            restore_tree), partial_restore=True)
        state = ckpt.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    finally:
        ckpt.close()
    params = {name: value for part in groups for name, value in state[part].items()}
    tokenizer_file = workdir / "data" / vc["tokenizer_file"]
    return Loaded(mdef, params, model, vision, multimodal, int(vc["max_images"]), vc.get("system_prompt", ""),
                  load_tokenizer(tokenizer_file), step)


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.multimodal.chat",
                                     description="Multi-image, multi-round chat with a VisualChat training workdir.")
    parser.add_argument("--workdir", required=True, help="a python -m jaxllm.multimodal.train workdir")
    parser.add_argument("--step", type=int, help="this checkpoint step instead of the latest")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat, in placeholder order)")
    parser.add_argument("--question", action="append", default=[],
                        help="one round's question; <image> marks where the next image goes (repeat for rounds)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per round")
    return parser.parse_args(argv)


def chat(args: argparse.Namespace, questions: Sequence[str]) -> list[dict[str, Any]]:
    """Runs the rounds; returns one record per round (question, answer)."""
    if not questions:
        raise UserError("no question: give --question TEXT (repeat for several rounds) or type questions on stdin")
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        loaded = load_workdir(args.workdir, mesh, args.step)
    questions = list(questions)
    placed = sum(q.count(data_lib.IMAGE_PLACEHOLDER) for q in questions)
    if placed == 0 and args.image:
        questions[0] = "".join(f"{data_lib.IMAGE_PLACEHOLDER}\n" for _ in args.image) + questions[0]
        placed = len(args.image)
    conversation = {"images": args.image, "turns": [{"question": q, "answer": ""} for q in questions]}
    conv = data_lib.parse_conversation(conversation, "the chat", Path.cwd(), loaded.max_images)
    data_lib.verify_images([conv])
    template = data_lib.Template(loaded.tokenizer, loaded.vision.tokens, loaded.system_prompt)
    generator = make_generator(loaded.mdef, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, stop_tokens=(loaded.tokenizer.eos_id,),
                               pad_id=max(loaded.tokenizer.pad_id, 0))
    records, done = [], []
    images_so_far = 0
    for round_, question in enumerate(questions):
        turn = data_lib.Turn(question, "")
        encoded = template.encode_turn(turn)
        images_so_far += encoded.images
        prompt = template.render([*done, encoded], conv.images[:images_so_far], last_answer=False)
        if len(prompt) + args.max_new_tokens > loaded.model.max_len:
            raise UserError(f"round {round_ + 1}: the conversation so far takes {len(prompt)} tokens; with "
                            f"--max-new-tokens {args.max_new_tokens} that exceeds the model's max_len="
                            f"{loaded.model.max_len}")
        with jax.set_mesh(mesh):
            answer = answer_questions(generator, loaded.params, [prompt], loaded.tokenizer, loaded.vision,
                                      loaded.max_images, loaded.model.max_len, args.max_new_tokens, batch_size=1,
                                      seed=args.seed + round_)[0]
        done.append(template.encode_turn(data_lib.Turn(question, answer)))
        records.append({"round": round_ + 1, "question": question, "answer": answer})
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        questions = args.question or [line.strip() for line in sys.stdin if line.strip()]
        records = chat(args, questions)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for record in records:
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"### Question:\n{record['question']}\n### Answer:\n{record['answer']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
