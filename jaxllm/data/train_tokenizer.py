"""Train a SentencePiece tokenizer for mixed Japanese/English text, with LLM-jp's trainer settings.

Usage::

    python -m jaxllm.data.train_tokenizer --input ja.txt en.jsonl [...] --out DIR \\
        [--vocab-size 50000] [--character-coverage 0.9995] [--user-symbol SYM ...] [--model-type unigram]

Writes ``DIR/tokenizer.model`` (and ``DIR/tokenizer.vocab``), which :func:`jaxllm.data.tokenizer.
load_tokenizer` and ``python -m jaxllm.data.prepare --tokenizer`` read. Inputs are ``.txt`` or
``.jsonl`` corpora (:mod:`jaxllm.data.corpus`); every line of every document is one sentence.

The defaults are the SentencePiece settings of llm-jp-tokenizer v2 (``scripts/howToCreateModel_ver2.md``
in github.com/llm-jp/llm-jp-tokenizer): a unigram model with byte fallback, identity normalisation
(no NFKC: full-width and half-width forms stay distinct), spaces kept as they are, digits split into
single pieces, whitespace-only pieces allowed, a ``"\\n"`` piece, and pieces of at most 16 characters
(LLM-jp uses 8 for its Japanese sub-vocabulary: ``--max-piece-length 8``). Character coverage is
SentencePiece's default 0.9995, which LLM-jp keeps; use about 0.98 for vocabularies of a few thousand.
Differences: the special ids follow jaxllm (``<pad>``=0, ``<unk>``=1, ``<s>``=2, ``</s>``=3, where
LLM-jp has ``<unk>``=0, ``<s>``=1, ``</s>``=2), and LLM-jp's separately trained Japanese, English
and code vocabularies merged and re-estimated by EM are one unigram training here.

On a user mistake the command prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from jaxllm.data.corpus import read_documents
from jaxllm.data.tokenizer import SENTENCEPIECE_FILE, SentencePieceTokenizer, train_tokenizer
from jaxllm.errors import UserError, exit_status


@dataclasses.dataclass(frozen=True)
class TokenizerRecipe:
    """SentencePiece trainer settings; the defaults are LLM-jp's (see the module docstring)."""

    vocab_size: int = 50_000
    character_coverage: float = 0.9995
    model_type: str = "unigram"
    user_defined_symbols: tuple[str, ...] = ("\n",)
    split_digits: bool = True
    max_piece_length: int = 16
    split_by_whitespace: bool = True
    allow_whitespace_only_pieces: bool = True
    add_dummy_prefix: bool = True
    max_sentence_length: int = 4192
    input_sentence_size: int = 0
    num_threads: int = 1


@dataclasses.dataclass(frozen=True)
class TrainReport:
    model: Path
    vocab_size: int
    lines: int
    characters: int
    tokens: int
    seconds: float

    @property
    def chars_per_token(self) -> float:
        return self.characters / max(self.tokens, 1)


def _corpus_lines(paths: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    for path in paths:
        for doc in read_documents(path):
            for line in doc.split("\n"):
                yield path, line


def train_llmjp_style(inputs: Sequence[str | Path], out_dir: str | Path,
                      recipe: TokenizerRecipe = TokenizerRecipe(), check_lines: int = 100_000) -> TrainReport:
    """Trains ``out_dir/tokenizer.model`` on corpus files and checks it on them.

    The first ``check_lines`` training lines are encoded again and must decode to themselves (a
    ``UserError`` otherwise); the report gives their characters per token, the usual compression
    measure.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("--input: found no corpus files; allowed: one or more .txt/.jsonl files")
    for path in paths:
        if not path.is_file():
            raise UserError(f"--input {path}: file not found; allowed: .txt or .jsonl corpus files")
    if recipe.max_piece_length < 1:
        raise UserError(f"--max-piece-length: found {recipe.max_piece_length}; allowed: a positive integer")
    symbols = list(dict.fromkeys(("\n", *recipe.user_defined_symbols)))  # "\n" first, no duplicates
    out = Path(out_dir)  # train_tokenizer creates it, and removes it again if training fails
    start = time.perf_counter()
    model = train_tokenizer(
        paths, out / Path(SENTENCEPIECE_FILE).stem, recipe.vocab_size, recipe.character_coverage,
        recipe.model_type, user_defined_symbols=symbols, split_digits=recipe.split_digits,
        max_piece_length=recipe.max_piece_length, split_by_whitespace=recipe.split_by_whitespace,
        allow_whitespace_only_pieces=recipe.allow_whitespace_only_pieces,
        add_dummy_prefix=recipe.add_dummy_prefix, max_sentence_length=recipe.max_sentence_length,
        input_sentence_size=recipe.input_sentence_size, num_threads=recipe.num_threads,
    )
    seconds = time.perf_counter() - start
    tok = SentencePieceTokenizer.load(model)
    lines = characters = tokens = 0
    for path, line in itertools.islice(_corpus_lines(paths), check_lines):
        ids = tok.encode(line)
        if tok.decode(ids) != line:
            raise UserError(f"tokenizer {model}: line {line[:40]!r} of {path} does not decode to itself")
        lines, characters, tokens = lines + 1, characters + len(line), tokens + len(ids)
    return TrainReport(model, tok.vocab_size, lines, characters, tokens, seconds)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    default = TokenizerRecipe()
    parser = argparse.ArgumentParser(prog="python -m jaxllm.data.train_tokenizer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt or .jsonl corpus files")
    parser.add_argument("--out", required=True, metavar="DIR", help="receives tokenizer.model and tokenizer.vocab")
    parser.add_argument("--vocab-size", type=int, default=default.vocab_size,
                        help="pieces in all, with 4 special ids, user symbols and 256 byte pieces")
    parser.add_argument("--character-coverage", type=float, default=default.character_coverage)
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default=default.model_type)
    parser.add_argument("--user-symbol", action="append", default=[], metavar="SYM",
                        help="a string always kept as one piece (repeatable); '\\n' is always included")
    parser.add_argument("--max-piece-length", type=int, default=default.max_piece_length)
    parser.add_argument("--no-split-digits", action="store_true", help="let digits merge into longer pieces")
    parser.add_argument("--no-dummy-prefix", action="store_true",
                        help="do not treat the start of a text as following a space")
    parser.add_argument("--no-split-by-whitespace", action="store_true", help="allow pieces across spaces")
    parser.add_argument("--max-sentence-length", type=int, default=default.max_sentence_length,
                        help="skip training lines longer than this many bytes")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on a random sample of this many lines (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="training threads (1: reproducible)")
    args = parser.parse_args(argv)
    recipe = TokenizerRecipe(
        vocab_size=args.vocab_size, character_coverage=args.character_coverage, model_type=args.model_type,
        user_defined_symbols=("\n", *args.user_symbol), split_digits=not args.no_split_digits,
        max_piece_length=args.max_piece_length, split_by_whitespace=not args.no_split_by_whitespace,
        add_dummy_prefix=not args.no_dummy_prefix, max_sentence_length=args.max_sentence_length,
        input_sentence_size=args.input_sentence_size, num_threads=args.threads,
    )

    def run() -> None:
        report = train_llmjp_style(args.input, args.out, recipe)
        print(f"wrote {report.model} (vocab {report.vocab_size}) in {report.seconds:.1f} s; {report.lines} lines, "
              f"{report.characters} characters -> {report.tokens} tokens ({report.chars_per_token:.2f} "
              "characters per token); each of these lines decodes to itself")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
