"""Tokenizers: SentencePiece training, and one small interface over SentencePiece and Hugging Face files.

Every tokenizer jaxllm uses satisfies :class:`TextTokenizer`: ``encode(text) -> ids`` (no BOS/EOS
added), ``decode(ids) -> text`` (special ids decode to nothing; ids outside the vocabulary, such as
the padding rows of a model's embedding, raise ``UserError``), ``vocab_size`` and the special ids
``pad_id``, ``unk_id``, ``bos_id``, ``eos_id`` (-1 when the tokenizer has no such token, as in
SentencePiece).
:func:`load_tokenizer` opens a SentencePiece ``.model``, a Hugging Face ``tokenizer.json``, or a
checkpoint directory holding either.

Every model trained here has ``pad=0``, ``unk=1``, ``bos=2``, ``eos=3``, byte fallback (so any UTF-8
text round-trips, including characters never seen in training), identity normalisation (whitespace,
newlines and tabs are kept exactly) and a ``"\\n"`` piece unless the caller's symbols leave it out.

Exact round trip, ``decode(encode(text)) == text`` for every string, holds for any SentencePiece
model with identity normalisation, ``remove_extra_whitespaces=false`` and byte fallback (see
:attr:`SentencePieceTokenizer.lossless`); that covers the models trained here and the LLM-jp and
Llama tokenizers. SentencePiece itself writes a space as the meta symbol U+2581 and so turns a
literal U+2581 in the input into a space; :meth:`SentencePieceTokenizer.encode` emits that character
as its three UTF-8 byte pieces instead, which decode back to it. A Hugging Face ``tokenizer.json``
round-trips exactly when its pipeline does (byte-level BPE such as GPT-2's always does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
from jaxtyping import Integer

from jaxllm.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPACE_META = "\u2581"  # SentencePiece's visible stand-in for a space
SENTENCEPIECE_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
INTEROP_HINT = "install the interop extra: pip install 'jaxllm[interop]'"


@runtime_checkable
class TextTokenizer(Protocol):
    """What the rest of jaxllm needs from a tokenizer."""

    path: Path

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | Integer[np.ndarray, " n"]) -> str: ...


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
    *,
    user_defined_symbols: Sequence[str] = ("\n",),
    split_digits: bool = False,
    max_piece_length: int = 16,
    split_by_whitespace: bool = True,
    allow_whitespace_only_pieces: bool = False,
    add_dummy_prefix: bool = True,
    max_sentence_length: int = 4192,
    input_sentence_size: int = 0,
    num_threads: int = 1,
) -> Path:
    """Trains a SentencePiece model and returns the path of ``{model_prefix}.model``.

    Args:
      documents_or_files: document texts (``str``) and/or corpus files (``pathlib.Path``, read with
        :func:`jaxllm.data.corpus.read_documents`). Each line of a document is one training sentence.
      model_prefix: output prefix; ``.model`` and ``.vocab`` files are written beside it.
      vocab_size: total pieces, including the 4 special ids, the user symbols and the 256 byte pieces.
      character_coverage: fraction of characters that get their own piece (the rest use bytes);
        0.9995 suits Japanese or Chinese text at large vocabularies, about 0.98 at a few thousand.
      model_type: ``"bpe"`` or ``"unigram"``.
      user_defined_symbols: strings always kept whole as one piece (matched before segmentation).
      split_digits: give every digit its own piece (numbers are never merged).
      max_piece_length: longest piece in characters.
      split_by_whitespace: pieces never span a space (a piece may start with one).
      allow_whitespace_only_pieces: allow pieces made only of spaces (runs of indentation).
      add_dummy_prefix: prepend a space to the text so a word has the same pieces at the start as
        after a space; decoding removes it again.
      max_sentence_length: training lines longer than this many bytes are skipped.
      input_sentence_size: train on a random sample of this many lines (0: all of them).
      num_threads: training threads; 1 gives the same model for the same input on every run.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"model_type: found '{model_type}'; allowed: 'bpe', 'unigram'")
    if not 0.0 < character_coverage <= 1.0:
        raise UserError(f"character_coverage: found {character_coverage}; allowed: 0 < value <= 1")
    symbols = list(user_defined_symbols)
    for symbol in symbols:
        if not isinstance(symbol, str) or not symbol or symbols.count(symbol) > 1:
            raise UserError(f"user_defined_symbols: found {symbol!r}; allowed: distinct non-empty strings")
        if symbol in ("<pad>", "<unk>", "<s>", "</s>"):
            raise UserError(f"user_defined_symbols: found {symbol!r}, which is a special piece (ids 0-3) already")
    prefix = Path(model_prefix)
    made = [d for d in (prefix.parent, *prefix.parent.parents) if not d.exists()]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    lines = _training_lines(documents_or_files)

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    try:
        first = next(lines, None)
        if first is None:
            raise UserError(f"tokenizer {prefix}.model: found no text to train on; allowed: non-empty documents")
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            user_defined_symbols=symbols, split_digits=split_digits, max_sentencepiece_length=max_piece_length,
            split_by_whitespace=split_by_whitespace, allow_whitespace_only_pieces=allow_whitespace_only_pieces,
            add_dummy_prefix=add_dummy_prefix, max_sentence_length=max_sentence_length,
            num_threads=num_threads, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0, minloglevel=2,
        )
    except RuntimeError as e:
        _remove_empty(made)
        reason = re.sub(r"^.*?\] ", "", str(e).strip().splitlines()[0])
        # The largest vocabulary a corpus allows depends on the model type (a unigram model usually
        # stops well below a BPE one), so the message names it.
        raise UserError(f"tokenizer {prefix}.model: vocab_size {vocab_size} rejected for a {model_type} model: "
                        f"{reason}") from None
    except BaseException:
        _remove_empty(made)
        raise
    return prefix.with_name(prefix.name + ".model")


def _remove_empty(directories: list[Path]) -> None:
    """Removes the directories a failed training created (innermost first), if nothing else was put there."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def _checked_ids(ids: Sequence[int] | Integer[np.ndarray, " n"], vocab_size: int, path: Path) -> list[int]:
    """``ids`` as Python ints, refusing any outside ``[0, vocab_size)`` (for example a padded model row)."""
    out = [int(i) for i in ids]
    bad = next((i for i in out if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise UserError(f"tokenizer {path}: token id {bad} is outside its vocabulary of {vocab_size} "
                        f"(ids 0..{vocab_size - 1}); mask logits of padded vocabulary rows before sampling")
    return out


class SentencePieceTokenizer:
    """A loaded SentencePiece model. ``encode`` adds no BOS/EOS; callers append ``eos_id`` themselves."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path):
        self._sp = processor
        self.path = path
        self.vocab_size = processor.get_piece_size()
        self.pad_id, self.unk_id = processor.pad_id(), processor.unk_id()
        self.bos_id, self.eos_id = processor.bos_id(), processor.eos_id()
        byte_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in SPACE_META.encode()]
        self._meta_bytes = byte_ids if all(processor.is_byte(i) for i in byte_ids) else None
        self._no_prefix: spm.SentencePieceProcessor | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
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
    def lossless(self) -> bool:
        """Whether ``decode(encode(text)) == text`` for every string (see the module docstring)."""
        proto = self._proto()
        norm = proto.normalizer_spec
        return (norm.name == "identity" and not norm.remove_extra_whitespaces and proto.trainer_spec.byte_fallback
                and self._meta_bytes is not None)

    def _proto(self) -> Any:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return proto

    def _without_dummy_prefix(self) -> spm.SentencePieceProcessor:
        """The same model with ``add_dummy_prefix`` off, for text that continues a sentence."""
        if self._no_prefix is None:
            proto = self._proto()
            if proto.normalizer_spec.add_dummy_prefix:
                proto.normalizer_spec.add_dummy_prefix = False
                processor = spm.SentencePieceProcessor()
                processor.load_from_serialized_proto(proto.SerializeToString())
                self._no_prefix = processor
            else:
                self._no_prefix = self._sp
        return self._no_prefix

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added).

        Each literal U+2581 becomes its byte pieces ``<0xE2> <0x96> <0x81>`` and the text after it is
        encoded as a continuation (no dummy prefix), so ``decode`` restores the character exactly.
        """
        if SPACE_META not in text or self._meta_bytes is None:
            return self._sp.encode(text)
        head, *rest = text.split(SPACE_META)
        ids = self._sp.encode(head)
        tail = self._without_dummy_prefix()
        for part in rest:
            ids += self._meta_bytes + tail.encode(part)
        return ids

    def decode(self, ids: Sequence[int] | Integer[np.ndarray, " n"]) -> str:
        """Text of a sequence of ids; special ids (pad/bos/eos) decode to nothing.

        An id outside the vocabulary raises ``UserError``.
        """
        return self._sp.decode(_checked_ids(ids, self.vocab_size, self.path))


Tokenizer = SentencePieceTokenizer  # the name existing callers import


def _import_tokenizers(path: Path) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"tokenizer {path}: reading a Hugging Face tokenizer.json needs the `tokenizers` "
                        f"library; {INTEROP_HINT}") from None
    return tokenizers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


# Conventional spellings, tried in order when no configuration file names a special token.
_KNOWN_SPECIALS = {
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<EOD|LLM-jp>"),
}


def _hf_special_ids(tok: Any, directory: Path, spec: dict[str, Any]) -> dict[str, int]:
    """Special ids from ``tokenizer_config.json``, ``special_tokens_map.json``, ``config.json``, the
    model's own unknown token, then conventional spellings, in that order of precedence; -1 if none."""
    configs = [_read_json(directory / "tokenizer_config.json"), _read_json(directory / "special_tokens_map.json")]
    model_config = _read_json(directory / "config.json")
    model = spec.get("model") or {}
    ids: dict[str, int] = {}
    for role, spellings in _KNOWN_SPECIALS.items():
        found: int | None = None
        for config in configs:
            token = config.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tok.token_to_id(token) is not None:
                found = tok.token_to_id(token)
                break
        if found is None and isinstance(model_config.get(f"{role}_token_id"), int):
            found = model_config[f"{role}_token_id"]
        if found is None and role == "unk":
            if isinstance(model.get("unk_id"), int):
                found = model["unk_id"]
            elif isinstance(model.get("unk_token"), str):
                found = tok.token_to_id(model["unk_token"])
        if found is None:
            found = next((tok.token_to_id(s) for s in spellings if tok.token_to_id(s) is not None), None)
        ids[role] = -1 if found is None else found
    return ids


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (the ``interop`` extra).

    ``encode`` never adds the file's post-processor tokens (for example the EOD that LLM-jp's
    tokenizer appends) and does not match special added tokens in the text (a literal
    ``"<|endoftext|>"`` in a document stays text), so it behaves like :class:`SentencePieceTokenizer`;
    non-special added tokens (like SentencePiece's user symbols) still match. ``decode`` skips special
    tokens. Special ids are read as :func:`_hf_special_ids` describes.
    """

    def __init__(self, tokenizer: Any, path: Path, special_ids: dict[str, int]):
        # Text is text: special added tokens are not matched in the input, so a literal "<|endoftext|>"
        # in a document is spelled with ordinary pieces, as SentencePiece does with "</s>".
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.path = path
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_id, self.unk_id = special_ids["pad"], special_ids["unk"]
        self.bos_id, self.eos_id = special_ids["bos"], special_ids["eos"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer {path}: file not found; allowed: a Hugging Face tokenizer.json")
        tokenizers = _import_tokenizers(path)
        spec = _read_json(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises its own exception type
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"tokenizer {path}: cannot load ({reason}); allowed: a Hugging Face tokenizer.json") \
                from None
        return cls(tok, path, _hf_special_ids(tok, path.parent, spec))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS or other template tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | Integer[np.ndarray, " n"]) -> str:
        """Text of a sequence of ids; special tokens decode to nothing.

        An id outside the vocabulary raises ``UserError``.
        """
        return self._tok.decode(_checked_ids(ids, self.vocab_size, self.path), skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer | HFTokenizer:
    """Opens a tokenizer file or the tokenizer in a checkpoint directory.

    A file ending in ``.json`` is read as a Hugging Face ``tokenizer.json``, any other file as a
    SentencePiece model. A directory uses its ``tokenizer.json`` (what ``transformers`` loads) and
    otherwise its ``tokenizer.model``; when only ``tokenizer.json`` exists the ``tokenizers`` library
    is required, and when both exist but that library is missing the SentencePiece model is used.

    Example::

        tok = load_tokenizer("checkpoints/llm-jp-13b-v1.0")   # a Hugging Face directory
        ids = tok.encode("日本語と English")
        assert tok.decode(ids) == "日本語と English"
    """
    path = Path(path)
    if path.is_dir():
        hf, sp = path / HF_FILE, path / SENTENCEPIECE_FILE
        if hf.is_file() and (not sp.is_file() or importlib.util.find_spec("tokenizers") is not None):
            return HFTokenizer.load(hf)
        if sp.is_file():
            return SentencePieceTokenizer.load(sp)
        raise UserError(f"tokenizer {path}: directory has neither {HF_FILE} nor {SENTENCEPIECE_FILE}; "
                        "allowed: a checkpoint directory with one of them, or the file itself")
    if path.suffix == ".json":
        return HFTokenizer.load(path)
    return SentencePieceTokenizer.load(path)


def workdir_tokenizer_file(workdir: str | Path) -> Path | None:
    """The tokenizer file a run's workdir carries (`data/tokenizer.json` or `data/tokenizer.model`), if any."""
    for name in (HF_FILE, SENTENCEPIECE_FILE):
        path = Path(workdir) / "data" / name
        if path.is_file():
            return path
    return None


def install_tokenizer(workdir: str | Path, source: Path | None, train_new: Callable[[Path], None]) -> TextTokenizer:
    """A run's tokenizer, kept in `WORKDIR/data/` so the workdir is self-contained: process 0 copies the
    file `source` there, or without one calls `train_new(prefix)` to train it at `prefix`; then every
    process loads it. Call it when the workdir holds none yet (`workdir_tokenizer_file`)."""
    from jaxllm import runtime

    data = Path(workdir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    if runtime.is_lead():
        if source is not None:
            shutil.copyfile(source, data / (HF_FILE if source.suffix == ".json" else SENTENCEPIECE_FILE))
        else:
            train_new(data / "tokenizer")
    runtime.barrier("tokenizer")
    return load_tokenizer(workdir_tokenizer_file(workdir))


def record_run_tokenizer(shard_dir: str | Path, workdir: str | Path) -> Path | None:
    """Keeps the tokenizer of the token shards a run reads in `WORKDIR/data/`, beside its checkpoints, so
    that the workdir alone decodes what it generates (shards of `data.source=tokens`, or of `text` with a
    `data.cache_dir`, live elsewhere). Returns the kept file, or None when the shards carry no tokenizer.

    A workdir that already holds a different tokenizer of the same name was trained on other token ids:
    that is a `UserError`, never an overwrite. Call on one process first (the copy is atomic)."""
    source = next((Path(shard_dir) / name for name in (SENTENCEPIECE_FILE, HF_FILE)
                   if (Path(shard_dir) / name).is_file()), None)
    if source is None:
        return None
    target = Path(workdir) / "data" / source.name
    if target.resolve() == source.resolve():
        return target
    if target.is_file():
        if target.read_bytes() != source.read_bytes():
            raise UserError(f"workdir {workdir}: its {target} differs from {source}, the tokenizer of the token "
                            "shards this run reads; the workdir was trained on other token ids: use another "
                            "--workdir")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target


def hugging_face_files(path: str | Path, max_len: int | None = None) -> tuple[dict[str, bytes], dict[str, int]]:
    """The files that put the tokenizer `path` into a Hugging Face model directory, and its special ids.

    Returns ({file name: contents}, {"bos_token_id": ..., "eos_token_id": ..., ...}) with the ids the
    tokenizer has. A SentencePiece model is written as `tokenizer.model`, a `tokenizer.json` as itself;
    either with a `tokenizer_config.json` that names the special tokens, adds no BOS/EOS (as jaxllm's
    `encode`) and asks for `PreTrainedTokenizerFast`, which `transformers` 5 builds from either file.
    """
    tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, SentencePieceTokenizer):
        spell = tokenizer._sp.id_to_piece
    else:
        spell = tokenizer._tok.id_to_token
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "unk": tokenizer.unk_id}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config |= {f"{role}_token": spell(i) for role, i in ids.items() if i >= 0}
    config |= {"add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if max_len is not None:
        config["model_max_length"] = max_len
    name = SENTENCEPIECE_FILE if isinstance(tokenizer, SentencePieceTokenizer) else HF_FILE
    files = {name: Path(tokenizer.path).read_bytes(),
             "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()}
    return files, {f"{role}_token_id": i for role, i in ids.items() if i >= 0 and role != "unk"}
