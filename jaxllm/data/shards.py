"""Token shards on disk: raw little-endian token files, document offsets and one JSON index.

A shard directory holds::

    index.json            {"format": "jaxllm.token_shards", "version": 1, "dtype": "uint16",
                           "vocab_size": V, "num_tokens": T, "num_documents": D,
                           "shards": [{"tokens": "shard_00000.bin", "offsets": "shard_00000.idx.npy",
                                       "num_tokens": n, "num_documents": d, "sha256": ...}, ...],
                           "metadata": {...}}
    shard_00000.bin       n tokens, raw little-endian uint16 (vocab_size <= 65536) or uint32
    shard_00000.idx.npy   int64 array of d + 1 document boundaries inside the shard: 0, ..., n

A document never spans two shards. Read together, the shards form one token stream (documents in
order, concatenated); :class:`TokenShards` memory-maps the files read-only and serves documents and
arbitrary stream slices. ``index.json`` is written last and atomically, so a directory either has a
complete index that matches its shard files or no index at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Integer

from jaxllm.data.jsonl import write_atomic
from jaxllm.errors import UserError

INDEX_NAME = "index.json"
FORMAT = "jaxllm.token_shards"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """The on-disk dtype name for a vocabulary: ``uint16`` up to 65536 ids, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_shard_files(docs_tokens: Iterable[Sequence[int]], tmp: Path, vocab_size: int,
                       dtype: np.dtype, tokens_per_shard: int) -> list[dict[str, Any]]:
    """Groups documents into shards (at most one shard buffered in memory) written inside ``tmp``."""
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    offsets: list[int] = [0]
    for doc_number, doc in enumerate(docs_tokens):
        arr = np.asarray(doc)
        if arr.size == 0:
            continue  # Empty documents carry no tokens and are dropped.
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"document {doc_number}: found shape {arr.shape} dtype {arr.dtype}; "
                            "allowed: a 1-D sequence of integer token ids")
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise UserError(f"document {doc_number}: found token id {bad}; "
                            f"allowed: 0 <= id < vocab_size {vocab_size}")
        pending.append(arr.astype(dtype))
        offsets.append(offsets[-1] + arr.size)
        if offsets[-1] >= tokens_per_shard:
            shards.append(_save_shard(tmp, f"shard_{len(shards):05d}", pending, offsets))
            pending, offsets = [], [0]
    if pending:
        shards.append(_save_shard(tmp, f"shard_{len(shards):05d}", pending, offsets))
    return shards


def _save_shard(tmp: Path, name: str, docs: list[np.ndarray], offsets: list[int]) -> dict[str, Any]:
    tokens = np.concatenate(docs).tobytes()
    _fsync_write(tmp / f"{name}.bin", tokens)
    with open(tmp / f"{name}.idx.npy", "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
        f.flush()
        os.fsync(f.fileno())
    # The digest of the tokens makes the index, and so a run's data fingerprint, change with them.
    return {"tokens": f"{name}.bin", "offsets": f"{name}.idx.npy", "num_tokens": offsets[-1],
            "num_documents": len(offsets) - 1, "sha256": hashlib.sha256(tokens).hexdigest()}


def write_shards(docs_tokens: Iterable[Sequence[int]], out_dir: str | os.PathLike, vocab_size: int,
                 tokens_per_shard: int = 1 << 24, metadata: dict[str, Any] | None = None) -> Path:
    """Writes documents of token ids as shards plus ``index.json`` into ``out_dir``; returns ``out_dir``.

    Args:
      docs_tokens: one sequence of token ids per document (any iterable; consumed once). Empty
        documents are dropped.
      out_dir: created if needed; other files in it (e.g. ``tokenizer.model``) are left alone, but
        shards from an earlier write are replaced.
      vocab_size: ids must lie in ``[0, vocab_size)``; picks uint16 or uint32 storage.
      tokens_per_shard: a shard is closed once it holds at least this many tokens.
      metadata: JSON-serialisable extras stored under ``"metadata"`` in the index.

    Files are written to a temporary directory first. The old index is removed before any old shard
    is replaced and the new index is renamed into place last, so a crash never leaves an index that
    disagrees with the shard files.
    """
    if vocab_size <= 0 or tokens_per_shard <= 0:
        raise UserError(f"write_shards: found vocab_size {vocab_size}, tokens_per_shard {tokens_per_shard}; "
                        "allowed: positive integers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = token_dtype(vocab_size)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".shards-"))
    try:
        shards = _write_shard_files(docs_tokens, tmp, vocab_size, DTYPES[dtype_name], tokens_per_shard)
        if not shards:
            raise UserError(f"{out}: found no tokens to write; allowed: at least one non-empty document")
        index = {
            "format": FORMAT, "version": 1, "dtype": dtype_name, "vocab_size": vocab_size,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards),
            "shards": shards, "metadata": metadata or {},
        }
        _fsync_write(tmp / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
        (out / INDEX_NAME).unlink(missing_ok=True)
        keep = {INDEX_NAME}
        for shard in shards:
            for key in ("tokens", "offsets"):
                os.replace(tmp / shard[key], out / shard[key])
                keep.add(shard[key])
        os.replace(tmp / INDEX_NAME, out / INDEX_NAME)
        for stale in list(out.glob("shard_*.bin")) + list(out.glob("shard_*.idx.npy")):
            if stale.name not in keep:
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_index(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise UserError(f"{directory}: token shard directory not found; "
                        "allowed: a directory written by python -m jaxllm.data.prepare")
    path = directory / INDEX_NAME
    if not path.is_file():
        raise UserError(f"{path}: index not found; allowed: a shard directory written by "
                        "python -m jaxllm.data.prepare")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read index ({e}); "
                        "allowed: the JSON written by write_shards") from None
    expected = {"dtype": str, "vocab_size": int, "shards": list}
    for key, kind in expected.items():
        if not isinstance(index, dict) or not isinstance(index.get(key), kind):
            raise UserError(f"{path}: key '{key}' missing or not {kind.__name__}; "
                            "allowed: the index format written by write_shards")
    if index["dtype"] not in DTYPES:
        raise UserError(f"{path}: found dtype '{index['dtype']}'; allowed: {', '.join(DTYPES)}")
    if not index["shards"]:
        raise UserError(f"{path}: found an empty shard list; allowed: at least one shard")
    return index


def _open_shard(directory: Path, entry: Any, dtype: np.dtype,
                index_path: Path) -> tuple[np.memmap, np.ndarray]:
    """Validates one shard entry and returns its token memmap and document offsets."""
    if not isinstance(entry, dict) or not all(k in entry for k in ("tokens", "offsets", "num_tokens")):
        raise UserError(f"{index_path}: found shard entry {entry!r}; "
                        "allowed: keys tokens, offsets, num_tokens")
    path = directory / entry["tokens"]
    count = entry["num_tokens"]
    if not path.is_file():
        raise UserError(f"{path}: shard file not found; allowed: the files listed in {index_path}")
    if not isinstance(count, int) or count <= 0:
        raise UserError(f"{path}: shard is empty (index says {count} tokens); allowed: at least one token")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise UserError(f"{path}: shard is truncated or corrupt: {size} bytes, index says {count} tokens x "
                        f"{dtype.itemsize} bytes = {count * dtype.itemsize}; allowed: sizes that match")
    offsets_path = directory / entry["offsets"]
    try:
        offsets = np.load(offsets_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{offsets_path}: cannot read document offsets ({e}); "
                        "allowed: an int64 .npy") from None
    if (offsets.ndim != 1 or offsets.size < 2 or not np.issubdtype(offsets.dtype, np.integer)
            or offsets[0] != 0 or offsets[-1] != count or np.any(np.diff(offsets) < 0)):
        raise UserError(f"{offsets_path}: found offsets that are not 0 <= ... <= {count}, non-decreasing; "
                        "allowed: document boundaries of the shard")
    return np.memmap(path, dtype=dtype, mode="r"), offsets.astype(np.int64)


class TokenShards:
    """Read-only, memory-mapped view of a shard directory as documents and one token stream.

    Attributes:
      directory: the shard directory.
      vocab_size: vocabulary size recorded in the index.
      num_tokens: total tokens over all shards.
      num_documents: total documents.
      document_starts: int64 array of ``num_documents + 1`` stream offsets; document ``i`` is
        ``stream[document_starts[i]:document_starts[i + 1]]``.
      metadata: the index's ``metadata`` dict.

    Pickles by path (workers reopen the memmaps instead of copying the data).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = _load_index(self.directory)
        index_path = self.directory / INDEX_NAME
        dtype = DTYPES[index["dtype"]]
        self.vocab_size: int = index["vocab_size"]
        self.metadata: dict[str, Any] = index.get("metadata") or {}
        self._files: list[Path] = []
        self._tokens: list[np.memmap] = []
        starts = [np.zeros(1, np.int64)]
        base = 0
        for entry in index["shards"]:
            tokens, offsets = _open_shard(self.directory, entry, dtype, index_path)
            self._files.append(self.directory / entry["tokens"])
            self._tokens.append(tokens)
            starts.append(offsets[1:] + base)
            base += tokens.size
        self._shard_starts = np.cumsum([0] + [t.size for t in self._tokens]).astype(np.int64)
        self.document_starts: np.ndarray = np.concatenate(starts)
        self.num_tokens: int = int(base)
        self.num_documents: int = self.document_starts.size - 1

    def __getstate__(self) -> dict[str, str]:
        return {"directory": str(self.directory)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["directory"])

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.directory)!r}, num_tokens={self.num_tokens}, "
                f"num_documents={self.num_documents}, vocab_size={self.vocab_size})")

    def document(self, i: int) -> Integer[np.ndarray, " n"]:
        """Tokens of document ``i`` (a read-only view into the shard memmap)."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents})")
        start, stop = int(self.document_starts[i]), int(self.document_starts[i + 1])
        shard = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        base = int(self._shard_starts[shard])
        return self._tokens[shard][start - base:stop - base]

    def read(self, start: int, stop: int) -> Integer[np.ndarray, " n"]:
        """A copy of ``stream[start:stop]`` (clipped to the stream) across shard boundaries."""
        start, stop = max(0, start), min(stop, self.num_tokens)
        if stop <= start:
            return np.zeros(0, self._tokens[0].dtype)
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        last = int(np.searchsorted(self._shard_starts, stop, side="left")) - 1
        pieces = []
        for shard in range(first, last + 1):
            base = int(self._shard_starts[shard])
            pieces.append(self._tokens[shard][max(start - base, 0):stop - base])
        return np.concatenate(pieces)

    def check_vocab(self, model_vocab_size: int, chunk_tokens: int = 1 << 22) -> None:
        """Raises ``UserError`` naming the file, offset and id if any token is ``>= model_vocab_size``."""
        for path, tokens in zip(self._files, self._tokens, strict=True):
            for begin in range(0, tokens.size, chunk_tokens):
                chunk = tokens[begin:begin + chunk_tokens]
                if int(chunk.max()) >= model_vocab_size:
                    where = int(np.argmax(chunk >= model_vocab_size))
                    raise UserError(f"{path}: found token id {int(chunk[where])} at offset {begin + where}; "
                                    f"allowed: ids < the model's vocab_size {model_vocab_size}")


def fingerprint(directory: str | os.PathLike) -> dict[str, str]:
    """What a checkpoint records of the data it was trained on: the SHA-256 of the shard directory's
    index (which lists every shard with its counts and the digest of its tokens) and of its tokenizer."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    out = {"index_sha256": file_sha256(index)}
    tokenizer = json.loads(index.read_text()).get("metadata", {}).get("tokenizer")
    if tokenizer and (directory / tokenizer).is_file():
        out["tokenizer_sha256"] = file_sha256(directory / tokenizer)
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (token shards and checkpoint files may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


VERIFIED_NAME = ".verified.json"  # shard files already checked against the index, by size and mtime


def verify_shards(directory: str | os.PathLike) -> None:
    """Checks every shard's tokens against the digest its `index.json` entry carries, and remembers
    the files it checked (by size, modification time and digest, in `DIR/.verified.json`) so that the
    next run hashes only what changed. Directories written before shards carried digests have nothing
    to check; a read-only directory is checked on every run."""
    directory = Path(directory)
    index = json.loads((directory / INDEX_NAME).read_text())
    cache_path = directory / VERIFIED_NAME
    try:
        checked = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        checked = {}
    changed = False
    for entry in index["shards"]:
        path = directory / entry["tokens"]
        if "sha256" not in entry or not path.is_file():
            continue  # a missing file is reported when the shards are opened
        stat = path.stat()
        key = f"{stat.st_size}:{stat.st_mtime_ns}:{entry['sha256']}"
        if checked.get(entry["tokens"]) == key:
            continue
        if file_sha256(path) != entry["sha256"]:
            raise UserError(f"{path}: its tokens differ from the digest in {directory / INDEX_NAME} (the file was "
                            "damaged or replaced); prepare the data again")
        checked[entry["tokens"]] = key
        changed = True
    if changed:
        with contextlib.suppress(OSError):
            write_atomic(cache_path, [json.dumps(checked, indent=1)])
