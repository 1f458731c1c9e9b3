"""Chat with a trained VisualChat model:

    python -m jaxllm.multimodal.chat --workdir runs/visualchat --image a.png --image b.png \\
        --question "<image>\\n<image>\\nWhich image has more circles?" [--question "And red shapes?" ...]

Each `--question` is one round; its `<image>` placeholders take the next `--image` files in order
(if the first question has none, one placeholder per image is put in front of it). The answer of
each round is generated greedily (or sampled, `jaxllm.multimodal.answer`) and kept in the history, so
later rounds see the whole conversation in DeepSpeed-VisualChat's template. Without `--question`,
questions are read from standard input, one per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from jaxllm import mesh as mesh_lib
from jaxllm.errors import UserError, exit_status
from jaxllm.generate import Sampling, check_sampling
from jaxllm.multimodal import data as data_lib
from jaxllm.multimodal.answer import answer_questions, load_workdir, make_generator


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
    mesh = mesh_lib.one_replica_mesh()
    with jax.set_mesh(mesh):
        loaded = load_workdir(args.workdir, mesh, args.step)
    questions = list(questions)
    if args.image and not any(data_lib.IMAGE_PLACEHOLDER in q for q in questions):
        questions[0] = "".join(f"{data_lib.IMAGE_PLACEHOLDER}\n" for _ in args.image) + questions[0]
    conversation = {"images": args.image, "turns": [{"question": q, "answer": ""} for q in questions]}
    conv = data_lib.parse_conversation(conversation, "the chat", Path.cwd(), loaded.max_images)
    data_lib.verify_images([conv])
    template = data_lib.Template(loaded.tokenizer, loaded.vision.tokens, loaded.system_prompt)
    generator = make_generator(loaded.mdef, Sampling.of(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                                        (loaded.tokenizer.eos_id,), max(loaded.tokenizer.pad_id, 0)))
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

    def run() -> None:
        questions = args.question or [line.strip() for line in sys.stdin if line.strip()]
        for record in chat(args, questions):
            if args.json:
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(f"### Question:\n{record['question']}\n### Answer:\n{record['answer']}\n")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
