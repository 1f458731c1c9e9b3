"""`python -m jaxllm.generate --workdir DIR | --hf DIR --prompt TEXT [...]`: text from a jaxllm run (plain or
compressed checkpoint) or a Hugging Face directory, printed or as JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax

from jaxllm import mesh as mesh_lib
from jaxllm.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE
from jaxllm.errors import UserError, exit_status
from jaxllm.generate import find_tokenizer, generate, load_hf, load_workdir


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected integers separated by spaces or commas") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.generate",
                                     description="Generate text from a jaxllm run or a Hugging Face directory.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a jaxllm training workdir: its latest checkpoint is used")
    source.add_argument("--hf", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--step", type=int, help="with --workdir: this checkpoint step instead of the latest")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    parser.add_argument("--prompt-ids", action="append", default=[],
                        help="a prompt as token ids, e.g. '5 17 9' (repeat for a batch)")
    parser.add_argument("--tokenizer", help="SentencePiece .model, tokenizer.json or a directory holding one "
                        "(default: the run's or the --hf directory's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 keeps all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-token", type=int, action="append", default=[],
                        help="an extra token id that ends a row (the tokenizer's EOS always does, unless --ignore-eos)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="override the model's compute dtype")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree (devices used)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Loads the model and tokenizer the arguments name, generates, and returns one record per prompt."""
    if not args.prompt and not args.prompt_ids:
        raise UserError("no prompt: give --prompt TEXT or --prompt-ids IDS (each may be repeated)")
    if args.tensor < 1 or args.tensor > jax.device_count():
        raise UserError(f"--tensor {args.tensor}: expected 1 to the {jax.device_count()} available devices")
    mesh = mesh_lib.one_replica_mesh(args.tensor)
    with jax.set_mesh(mesh):
        if args.workdir is not None:
            model, _ = load_workdir(args.workdir, mesh, args.step, args.compute_dtype)
        else:
            model = load_hf(args.hf, mesh, args.compute_dtype)
        tokenizer = find_tokenizer(args.tokenizer, args.workdir, args.hf)
        if args.prompt and tokenizer is None:
            where = " or ".join(f"data/{name}" if args.workdir else name for name in (HF_FILE, SENTENCEPIECE_FILE))
            raise UserError(f"--prompt needs a tokenizer and none was found in {args.workdir or args.hf} ({where}); "
                            "pass --tokenizer FILE or use --prompt-ids")
        prompts = [tokenizer.encode(text) for text in args.prompt]
        prompts += [_parse_ids(text, "--prompt-ids") for text in args.prompt_ids]
        stops = list(args.stop_token)
        if tokenizer is not None and tokenizer.eos_id >= 0 and not args.ignore_eos:
            stops.append(tokenizer.eos_id)
        pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id >= 0 else 0
        new, logprobs = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, seed=args.seed,
                                 pad_id=pad_id, return_logprobs=True)
    texts = args.prompt + [None] * len(args.prompt_ids)
    records = []
    for text, prompt, ids, lps in zip(texts, prompts, new, logprobs, strict=True):
        record = {"prompt": text, "prompt_ids": prompt, "new_ids": ids, "logprob": float(sum(lps)),
                  "stopped": bool(ids) and ids[-1] in stops}
        if tokenizer is not None:
            # The completion is what the new ids add to the prompt's text: decoded alone, SentencePiece would
            # drop the space that starts it ("The weather" + "today" instead of " today").
            record["prompt_text"] = tokenizer.decode(prompt)
            whole = tokenizer.decode(prompt + ids)
            record["completion"] = (whole[len(record["prompt_text"]):] if whole.startswith(record["prompt_text"])
                                    else tokenizer.decode(ids))
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return exit_status(lambda: show(run(args), args.json))


def show(records: list[dict[str, Any]], as_json: bool) -> None:
    for record in records:
        if as_json:
            print(json.dumps(record, ensure_ascii=False))
        elif "completion" in record:
            print(record["prompt_text"] + record["completion"])
            print()
        else:
            print(" ".join(map(str, record["prompt_ids"] + record["new_ids"])))


if __name__ == "__main__":
    sys.exit(main())
