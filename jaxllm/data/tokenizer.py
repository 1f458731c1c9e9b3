"""SentencePiece tokenizer: deterministic training and a small wrapper with fixed special ids.

Every model trained here has ``pad=0``, ``unk=1``, ``bos=2``, ``eos=3``, byte fallback (so any UTF-8
text round-trips, including characters never seen in training), identity normalisation (whitespace,
newlines and tabs are kept exactly) and a single ``"\\n"`` piece.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from jaxtyping import Integer

from jaxllm.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def _training_lines(documents_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yields the non-blank lines of every document; ``os.PathLike`` items are read as corpus files."""
    from jaxllm.data.corpus import read_documents

    for item in documents_or_files:
        docs = read_documents(item) if isinstance(item, os.PathLike) else [item]
        for doc in docs:
            for line in doc.split("\n"):
                if line.strip():
                    yield line


def train_tokenizer(
    documents_or_files: Iterable[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    character_coverage: float = 1.0,
    model_type: str = "bpe",
) -> Path:
    """Trains a SentencePiece model and returns the path of ``{model_prefix}.model``.

    Args:
      documents_or_files: document texts (``str``) and/or corpus files (``pathlib.Path``, read with
        :func:`jaxllm.data.corpus.read_documents`). Each line of a document is one training sentence.
      model_prefix: output prefix; ``.model`` and ``.vocab`` files are written beside it.
      vocab_size: total pieces, including the 4 special ids and the 256 byte pieces.
      character_coverage: fraction of characters that get their own piece (the rest use bytes);
        use about 0.98 for Japanese or Chinese text.
      model_type: ``"bpe"`` or ``"unigram"``.

    Training uses one thread and no sentence sampling, so the same input gives the same model.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"model_type: found '{model_type}'; allowed: 'bpe', 'unigram'")
    if not 0.0 < character_coverage <= 1.0:
        raise UserError(f"character_coverage: found {character_coverage}; allowed: 0 < value <= 1")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = _training_lines(documents_or_files)
    first = next(lines, None)
    if first is None:
        raise UserError(f"tokenizer {prefix}.model: found no text to train on; allowed: non-empty documents")

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            user_defined_symbols=["\n"], num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as e:
        reason = re.sub(r"^.*?\] ", "", str(e).strip().splitlines()[0])
        raise UserError(f"tokenizer {prefix}.model: vocab_size {vocab_size} rejected: {reason}") from None
    return prefix.with_name(prefix.name + ".model")


class Tokenizer:
    """A loaded SentencePiece model. ``encode`` adds no BOS/EOS; callers append ``eos_id`` themselves."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path):
        self._sp = processor
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a ``.model`` file; a missing or unreadable file raises ``UserError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer {path}: file not found; allowed: a SentencePiece .model file")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"tokenizer {path}: cannot load ({reason}); "
                            "allowed: a SentencePiece .model file") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | Integer[np.ndarray, " n"]) -> str:
        """Text of a sequence of ids; special ids (pad/bos/eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])
