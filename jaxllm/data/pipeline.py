"""Training rows and the Grain pipeline: packed rows from token shards, synthetic rows, batching.

Every source here is random-access (``__len__``/``__getitem__``) and returns one row as a dict of
numpy arrays, each of shape ``[seq_len]``:

* ``inputs`` int32: token ids fed to the model.
* ``targets`` int32: the next token of each input.
* ``segment_ids`` int32: 1, 2, 3, ... for each document inside the row, 0 for padding. The model
  masks attention to equal segment ids, so a row never attends across documents.
* ``positions`` int32: the token's position inside its document.
* ``loss_mask`` float32: 1 where the target is the real next token of the same document, else 0.

Batches stack rows into ``[batch, seq_len]`` arrays with the same keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

from jaxllm.data.shards import TokenShards
from jaxllm.errors import UserError

Row = dict[str, np.ndarray]
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class RowSource(Protocol):
    """Anything with a length and integer indexing that returns a :data:`Row`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Row: ...


def _check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"row {index} out of range [0, {length})")
    return index


class PackedRows:
    """The shard stream cut into rows of ``seq_len`` inputs (plus one token of look-ahead).

    Row ``i`` reads ``stream[i * seq_len : i * seq_len + seq_len + 1]``: ``inputs`` are its first
    ``seq_len`` tokens and ``targets`` the last ``seq_len``. Each document already ends with EOS, so
    the EOS is a target of its own document, and the first token of the next document is not (mask 0).
    The final partial row is padded with ``pad_id`` (segment 0, position 0, mask 0). There are
    ``ceil((num_tokens - 1) / seq_len)`` rows: every row has at least one real target.

    Args:
      shards: the token stream.
      seq_len: tokens per row.
      continue_positions: if True (the default), a document that began in an earlier row keeps
        counting positions from its true offset (positions may exceed ``seq_len``, which suits
        relative schemes such as RoPE or ALiBi). If False, positions restart at 0 at the row start,
        keeping them below ``seq_len`` for learned absolute position embeddings.
      pad_id: token id used for padding.
    """

    def __init__(self, shards: TokenShards, seq_len: int, continue_positions: bool = True, pad_id: int = 0):
        if seq_len <= 0:
            raise UserError(f"seq_len: found {seq_len}; allowed: a positive integer")
        self.shards = shards
        self.seq_len = seq_len
        self.continue_positions = continue_positions
        self.pad_id = pad_id
        self._rows = max(0, -(-(shards.num_tokens - 1) // seq_len))

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> Row:
        index = _check_index(index, self._rows)
        length = self.seq_len
        start = index * length
        tokens = self.shards.read(start, start + length + 1).astype(np.int32)
        real = tokens.size  # Stream positions start .. start + real - 1 exist.
        stream_pos = np.arange(start, start + real, dtype=np.int64)
        doc = np.searchsorted(self.shards.document_starts, stream_pos, side="right") - 1
        padded = np.full(length + 1, self.pad_id, np.int32)
        padded[:real] = tokens
        segment = np.zeros(length + 1, np.int32)
        segment[:real] = 1 + np.concatenate([[0], np.cumsum(doc[1:] != doc[:-1])])
        positions = np.zeros(length + 1, np.int64)
        positions[:real] = stream_pos - self.shards.document_starts[doc]
        if not self.continue_positions and real:
            first = segment[:real] == 1
            positions[:real][first] -= positions[0]
        same_doc = np.zeros(length, bool)
        same_doc[:real - 1] = doc[1:] == doc[:-1]
        return {
            "inputs": padded[:length],
            "targets": padded[1:].copy(),
            "segment_ids": segment[:length],
            "positions": positions[:length].astype(np.int32),
            "loss_mask": same_doc.astype(np.float32),
        }


class SyntheticRows:
    """Deterministic rows of a learnable token pattern, for benchmarks and smoke tests.

    Row ``i`` draws (from ``seed`` and ``i``) a start token and a stride in ``{1, 2, 3}``; token
    ``j`` is ``(start + stride * j) % vocab_size``, and about 5% of tokens are replaced by uniform
    noise. One segment per row, positions ``0 .. seq_len - 1``, loss mask all ones.
    """

    def __init__(self, vocab_size: int, seq_len: int, num_rows: int, seed: int = 0):
        if min(vocab_size, seq_len, num_rows) <= 0:
            raise UserError(f"SyntheticRows: found vocab_size {vocab_size}, seq_len {seq_len}, "
                            f"num_rows {num_rows}; allowed: positive integers")
        self.vocab_size, self.seq_len, self.num_rows, self.seed = vocab_size, seq_len, num_rows, seed

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> Row:
        index = _check_index(index, self.num_rows)
        rng = np.random.default_rng([self.seed, index])
        start, stride = rng.integers(self.vocab_size), rng.integers(1, 4)
        tokens = (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size
        noise = rng.random(self.seq_len + 1) < 0.05
        random_tokens = rng.integers(self.vocab_size, size=self.seq_len + 1)
        tokens = np.where(noise, random_tokens, tokens).astype(np.int32)
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "segment_ids": np.ones(self.seq_len, np.int32),
            "positions": np.arange(self.seq_len, dtype=np.int32),
            "loss_mask": np.ones(self.seq_len, np.float32),
        }


class RowRange:
    """Rows ``[start, stop)`` of another source, re-indexed from 0."""

    def __init__(self, source: RowSource, start: int, stop: int):
        assert 0 <= start <= stop <= len(source), (start, stop, len(source))
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Row:
        return self.source[self.start + _check_index(index, len(self))]


def split_train_eval(source: RowSource, eval_fraction: float | None = None,
                     eval_rows: int | None = None) -> tuple[RowRange, RowRange]:
    """Splits a source by row index: the last rows are held out for evaluation.

    Give exactly one of ``eval_fraction`` (rounded, at least one row) or ``eval_rows``. Both parts
    must keep at least one row.
    """
    total = len(source)
    if (eval_fraction is None) == (eval_rows is None):
        raise UserError("split_train_eval: give exactly one of eval_fraction or eval_rows")
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise UserError(f"eval_fraction: found {eval_fraction}; allowed: 0 < value < 1")
        eval_rows = max(1, round(eval_fraction * total))
    assert eval_rows is not None
    if not 0 < eval_rows < total:
        raise UserError(f"eval_rows: found {eval_rows} of {total} rows; allowed: 1 <= eval_rows < {total}")
    return RowRange(source, 0, total - eval_rows), RowRange(source, total - eval_rows, total)


def stack_rows(rows: Sequence[Row]) -> Row:
    """Stacks rows into a batch dict of ``[len(rows), seq_len]`` arrays."""
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _local_batch_size(source: RowSource, global_batch_size: int, process_index: int,
                      process_count: int) -> int:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} / process_count {process_count}: "
                        "allowed: 0 <= process_index < process_count")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"global_batch_size: found {global_batch_size}; allowed: a positive multiple of "
                        f"the process count {process_count}")
    if len(source) < global_batch_size:
        raise UserError(f"global_batch_size: found {global_batch_size} but the data has only {len(source)} "
                        "rows; allowed: at most the number of rows")
    return global_batch_size // process_count


def make_train_dataset(source: RowSource, global_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
    """The training ``MapDataset``: shuffled, endlessly repeated, sharded per process, batched.

    Each epoch is a fresh permutation of all rows (the shuffle seed is folded with the epoch). The
    process shard is taken after repeating, so global step ``k`` consumes rows
    ``k * global_batch_size ... (k + 1) * global_batch_size - 1`` of the shuffled stream, and process
    ``p`` gets every ``process_count``-th of them starting at ``p``: the process shards are disjoint
    slices of the stream and together form the same global batch for any process count. A batch that
    spans an epoch boundary may hold a row from both epochs.
    """
    local = _local_batch_size(source, global_batch_size, process_index, process_count)
    dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    dataset = dataset[process_index::process_count]
    return dataset.batch(local, drop_remainder=True)


def make_train_iterator(source: RowSource, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, read_options: grain.ReadOptions | None = None
                        ) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches (see :func:`make_train_dataset`).

    Returns a ``grain`` ``DatasetIterator``: ``get_state()`` gives a small JSON-serialisable dict and
    ``set_state(state)`` on an iterator built with the same arguments resumes exactly. Reading runs
    in-process (threads prefetch; no worker processes). ``read_options`` defaults to 2 threads and a
    prefetch buffer of 4 batches.
    """
    dataset = make_train_dataset(source, global_batch_size, seed, process_index, process_count)
    options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(dataset.to_iter_dataset(options))


def make_eval_batches(source: RowSource, global_batch_size: int, num_batches: int, process_index: int = 0,
                      process_count: int = 1, what: str = "the held-out split (data.eval_fraction)") -> list[Row]:
    """A fixed list of this process's eval batches, in row order (identical on every call).

    Global batch ``k`` is rows ``k * global_batch_size ... (k + 1) * global_batch_size - 1``, split
    between processes as in training. If the source holds fewer than ``num_batches`` full batches,
    only the full ones are returned; fewer rows than one batch is an error that names `what`.
    """
    if len(source) < global_batch_size:
        raise UserError(f"{what} has only {len(source)} rows, fewer than one batch (train.batch_size="
                        f"{global_batch_size}); give it more rows or lower train.batch_size")
    local = _local_batch_size(source, global_batch_size, process_index, process_count)
    if num_batches <= 0:
        raise UserError(f"num_batches: found {num_batches}; allowed: a positive integer")
    count = min(num_batches, len(source) // global_batch_size)
    batches = []
    for k in range(count):
        rows = range(k * global_batch_size + process_index, (k + 1) * global_batch_size, process_count)
        assert len(rows) == local
        batches.append(stack_rows([source[i] for i in rows]))
    return batches


def padded_eval_batches(source: RowSource, batch_size: int, limit: int = 0, process_index: int = 0,
                        process_count: int = 1) -> list[Row]:
    """Every held-out row (or the first `limit` batches) in fixed-size batches, in row order.

    Unlike `make_eval_batches`, the last batch is filled up with copies of row 0 whose `weight` is 0, so
    every real row counts once; each process gets every `process_count`-th row of a global batch.
    """
    count = -(-len(source) // batch_size)
    if limit:
        count = min(count, limit)
    batches = []
    for k in range(count):
        rows = range(k * batch_size + process_index, (k + 1) * batch_size, process_count)
        real = [i < len(source) for i in rows]
        batch = stack_rows([source[i if ok else 0] for i, ok in zip(rows, real, strict=True)])
        batch["weight"] = np.asarray(real, np.float32)
        batches.append(batch)
    return batches
