"""Turns the `data:` config section into training and evaluation row sources.

`synthetic` generates rows; `text` tokenizes corpus files (by default the offline corpus built from
the Python standard library's docstrings) into cached token shards on first use; `tokens` reads
shards written by `python -m jaxllm.data.prepare`.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxllm.config import Config
from jaxllm.data.corpus import build_stdlib_corpus
from jaxllm.data.pipeline import PackedRows, RowSource, SyntheticRows, split_train_eval
from jaxllm.data.prepare import prepare_corpus
from jaxllm.data.shards import TokenShards
from jaxllm.data.tokenizer import record_run_tokenizer
from jaxllm.errors import UserError

STDLIB_CORPUS = "stdlib_docstrings.jsonl"


def _text_inputs(config: Config, cache: Path) -> list[Path]:
    if not config.data.path:
        corpus = cache / STDLIB_CORPUS
        if not corpus.exists():
            build_stdlib_corpus(corpus)
        return [corpus]
    paths = [Path(p.strip()) for p in config.data.path.split(",") if p.strip()]
    for path in paths:
        if not path.is_file():
            raise UserError(f"config key 'data.path': corpus file '{path}' does not exist")
    return paths


def _prepared(cache: Path, inputs: list[Path], vocab_size: int, tokenizer: str | None) -> bool:
    """Whether `cache` already holds shards made from exactly these inputs and tokenizer settings."""
    index = cache / "index.json"
    if not index.exists():
        return False
    meta = json.loads(index.read_text()).get("metadata", {})
    return meta.get("inputs") == [str(p) for p in inputs] and meta.get("request") == [vocab_size, tokenizer]


def prepare_text(config: Config, workdir: Path) -> Path:
    """Tokenizes the configured corpus into shards (once) and returns their directory.

    Call on one process only; the others wait at a barrier and then open the same directory.
    """
    cache = Path(config.data.cache_dir) if config.data.cache_dir else workdir / "data"
    cache.mkdir(parents=True, exist_ok=True)
    inputs = _text_inputs(config, cache)
    tokenizer = config.data.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise UserError(f"config key 'data.tokenizer': tokenizer file '{tokenizer}' does not exist")
    if not _prepared(cache, inputs, config.model.vocab_size, tokenizer):
        prepare_corpus(inputs, cache, vocab_size=config.model.vocab_size, tokenizer=tokenizer,
                       metadata={"request": [config.model.vocab_size, tokenizer]})
    return cache


def token_directory(config: Config, workdir: Path) -> Path | None:
    """The shard directory this config reads (preparing text if needed); None for synthetic data.

    Its tokenizer is kept in `WORKDIR/data/` too, so the workdir alone decodes what it generates."""
    if config.data.source == "synthetic":
        return None
    shard_dir = prepare_text(config, workdir) if config.data.source == "text" else Path(config.data.path)
    if shard_dir.is_dir():  # a missing directory is named by build_sources
        record_run_tokenizer(shard_dir, workdir)
    return shard_dir


def build_sources(config: Config, shard_dir: Path | None) -> tuple[RowSource, RowSource | None]:
    """(train rows, held-out eval rows or None) for this config."""
    d, m = config.data, config.model
    if shard_dir is None:
        rows: RowSource = SyntheticRows(m.vocab_size, d.seq_len, d.synthetic_rows, seed=config.seed)
    else:
        shards = TokenShards(shard_dir)
        shards.check_vocab(m.vocab_size)
        # Positions restart at each row so learned absolute embeddings never see one past max_len.
        rows = PackedRows(shards, d.seq_len, continue_positions=False)
    if d.eval_fraction == 0 or len(rows) < 2:
        return rows, None
    return split_train_eval(rows, eval_fraction=d.eval_fraction)
