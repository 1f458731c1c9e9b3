"""Corpus files -> tokenizer -> token shards, as a function and a command.

Usage::

    python -m jaxllm.data.prepare --input corpus.jsonl [more.txt ...] --out DIR \\
        [--tokenizer MODEL.model | --train-tokenizer] [--vocab-size N] [--tokens-per-shard N]

Inputs use the formats of :mod:`jaxllm.data.corpus` (``.jsonl`` or ``.txt``). Without
``--tokenizer`` a SentencePiece BPE model (:func:`jaxllm.data.tokenizer.train_tokenizer`'s settings)
is trained on the inputs into ``DIR/tokenizer.model``; a given model is copied there, so ``DIR`` is
self-contained. Every document is encoded and followed by EOS, then written as shards with
``DIR/index.json``. On a user mistake the command prints one line and exits with status 2, and a
directory it created is removed again.

``python -m jaxllm.data.train_tokenizer`` trains a unigram model with LLM-jp's settings instead. The
largest vocabulary a corpus allows depends on the model type (on a small corpus a unigram model's is
often half a BPE model's), so ``--vocab-size`` may pass here and fail there on the same files; both
name the limit SentencePiece found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxllm import runtime
from jaxllm.data.corpus import read_documents
from jaxllm.data.shards import TokenShards, write_shards
from jaxllm.data.tokenizer import Tokenizer, train_tokenizer
from jaxllm.errors import UserError, exit_status

TOKENIZER_NAME = "tokenizer.model"


def prepare_corpus(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int = 8000,
                   tokenizer: str | os.PathLike | None = None, tokens_per_shard: int = 1 << 24,
                   character_coverage: float = 1.0, metadata: dict[str, Any] | None = None) -> Path:
    """Tokenizes corpus files into a shard directory and returns it.

    Args:
      inputs: ``.jsonl`` / ``.txt`` corpus files.
      out_dir: receives ``tokenizer.model`` (and ``.vocab`` when trained), ``index.json`` and shards.
      vocab_size: size of the trained tokenizer; ignored when ``tokenizer`` is given.
      tokenizer: an existing SentencePiece ``.model`` to use (copied into ``out_dir``) instead of
        training one.
      tokens_per_shard: passed to :func:`jaxllm.data.shards.write_shards`.
      character_coverage: passed to :func:`jaxllm.data.tokenizer.train_tokenizer`.
      metadata: more entries for the index metadata.

    The index metadata records the tokenizer file name, its EOS id and the input paths. If anything
    fails, the directories this call created are removed (an existing ``out_dir`` is kept).
    """
    paths = [Path(p) for p in inputs]
    made = [d for d in (Path(out_dir), *Path(out_dir).parents) if not d.exists()]  # removed again on failure
    try:
        return _prepare(paths, out_dir, vocab_size, tokenizer, tokens_per_shard, character_coverage, metadata)
    except BaseException:
        if made and made[-1].is_dir():
            shutil.rmtree(made[-1], ignore_errors=True)
        raise


def _prepare(paths: list[Path], out_dir: str | os.PathLike, vocab_size: int, tokenizer: str | os.PathLike | None,
             tokens_per_shard: int, character_coverage: float, metadata: dict[str, Any] | None) -> Path:
    if not paths:
        raise UserError("--input: found no corpus files; allowed: one or more .jsonl/.txt files")
    documents = {path: read_documents(path) for path in paths}
    if not any(documents.values()):
        names = " ".join(map(str, paths))
        raise UserError(f"--input {names}: found no documents; allowed: non-empty corpora")
    out = runtime.make_directory(out_dir, "--out")
    model_path = out / TOKENIZER_NAME
    if tokenizer is None:
        docs = [doc for docs in documents.values() for doc in docs]
        train_tokenizer(docs, out / "tokenizer", vocab_size, character_coverage=character_coverage)
    else:
        source = Tokenizer.load(tokenizer).path
        if source.resolve() != model_path.resolve():
            shutil.copyfile(source, model_path)
    tok = Tokenizer.load(model_path)

    def encoded() -> Iterator[list[int]]:
        for docs in documents.values():
            for doc in docs:
                yield [*tok.encode(doc), tok.eos_id]

    metadata = {"tokenizer": TOKENIZER_NAME, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                "inputs": [str(p) for p in paths], **(metadata or {})}
    return write_shards(encoded(), out, tok.vocab_size, tokens_per_shard=tokens_per_shard, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxllm.data.prepare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".jsonl or .txt corpus files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", metavar="MODEL", help="existing SentencePiece .model file")
    which.add_argument("--train-tokenizer", action="store_true", help="train DIR/tokenizer.model (default)")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="vocabulary size of the BPE model trained when no --tokenizer is given")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--tokens-per-shard", type=int, default=1 << 24)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards and tokenizer of an existing --out directory")
    args = parser.parse_args(argv)

    def run() -> None:
        existing = sorted(p.name for p in Path(args.out).iterdir()) if Path(args.out).is_dir() else []
        if existing and not args.overwrite:
            raise UserError(f"--out {args.out}: already holds {', '.join(existing[:4])}"
                            f"{', ...' if len(existing) > 4 else ''}; a run trained on it would resume on other "
                            "token ids. Use a new directory, or --overwrite to replace it")
        out = prepare_corpus(args.input, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                             tokens_per_shard=args.tokens_per_shard, character_coverage=args.character_coverage)
        shards = TokenShards(out)
        print(f"wrote {shards.num_documents} documents, {shards.num_tokens} tokens "
              f"(vocab {shards.vocab_size}) to {out}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
