"""Offline data analyzer: difficulty of every training row, as index files for the curriculum sampler.

    python -m jaxllm.data.analyze --data SHARD_DIR --seq-len 512 --out INDEX_DIR \\
        [--metrics vocab_rarity,NAME=package.module:function] [--workers 2] [--chunk-rows 4096]

A sample is a training row: row ``i`` of ``PackedRows(TokenShards(SHARD_DIR), seq_len)``, the rows
`jaxllm.train` reads from the same directory and ``data.seq_len``. Like DeepSpeed's `DataAnalyzer`
(spec section 3) the work is a map over contiguous row ranges in worker processes followed by a
reduce; the output per metric, in ``INDEX_DIR/<metric>/``, is

    sample_to_metric.npy                      row -> value (smallest fitting integer dtype)
    index_to_metric.npy                       the distinct values, ascending
    index_to_sample.npy + .offsets.npy        ragged rows: row j = the samples whose value is the j-th
                                              smallest (ascending sample ids); row j is
                                              data[offsets[j]:offsets[j + 1]]
    index_to_sample_percentile_merged.npy     every max(1, #values // 100) value rows concatenated
      + .offsets.npy
    metric.json                               fingerprint of the data, counts, 5%-step percentiles

Metrics: ``vocab_rarity`` (first reduces ``total_vocab_freq.npy``, the token counts over all rows;
then ``p = freq / sum(freq)`` with unseen tokens at p = 1, and a row's value is
``int(sum over its tokens of -log p)``, a sum that grows with length as DeepSpeed's does), and
user-defined ones, ``NAME=module:function`` with ``function(row) -> int`` where ``row`` is the dict of
numpy arrays a `PackedRows` row is. Tokens of a row are its ``inputs`` outside padding (segment 0).

Restartable: each map task writes one chunk file atomically, so a rerun of the same command after a
crash maps only the missing chunks; a finished metric (its ``metric.json`` present and matching) is not
redone. The fingerprint (a hash of the shard index and the row length) is stored with every index, and
`open_metric_index` refuses an index built for other data.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxllm.data.jsonl import write_atomic
from jaxllm.data.pipeline import PackedRows
from jaxllm.data.shards import INDEX_NAME, TokenShards
from jaxllm.errors import UserError, exit_status

BUILTIN_METRICS = ("vocab_rarity",)
VOCAB_FREQ = "total_vocab_freq"
MAP_DIR = ".map"


def dataset_fingerprint(shard_dir: str | os.PathLike, seq_len: int) -> str:
    """A hash naming the exact rows a metric index describes: the shard index file and the row length."""
    index = Path(shard_dir) / INDEX_NAME
    if not index.is_file():
        raise UserError(f"{index}: token shard index not found; expected a directory written by "
                        "python -m jaxllm.data.prepare")
    digest = hashlib.sha256(index.read_bytes())
    digest.update(f"|packed_rows|seq_len={seq_len}|continue_positions=False".encode())
    return digest.hexdigest()[:32]


def fit_int_dtype(low: int, high: int) -> np.dtype:
    """The smallest integer dtype holding [low, high] (as DeepSpeed's `find_fit_int_dtype`)."""
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise UserError(f"metric values [{low}, {high}] do not fit a 64-bit integer")


def row_tokens(row: dict[str, np.ndarray]) -> np.ndarray:
    """The tokens a metric sees: the row's inputs without padding."""
    return row["inputs"][row["segment_ids"] != 0]


def vocab_rarity(row: dict[str, np.ndarray], log_p: np.ndarray) -> int:
    """``int(sum(-log p(token)))`` over the row's tokens, with `log_p` from the whole dataset."""
    return int(-np.sum(log_p[row_tokens(row)], dtype=np.float64))


def log_probabilities(freq: np.ndarray) -> np.ndarray:
    """log(freq / sum(freq)) with unseen tokens given p = 1 (log 0), as DeepSpeed's example does."""
    freq = freq.astype(np.float64)
    p = freq / max(freq.sum(), 1.0)
    p[p == 0] = 1.0
    return np.log(p)


def resolve_metric(spec: str) -> tuple[str, str | None]:
    """(name, 'module:function' or None for a built-in) from a --metrics entry."""
    if spec in BUILTIN_METRICS:
        return spec, None
    name, sep, target = spec.partition("=")
    if not sep or ":" not in target or not name:
        raise UserError(f"--metrics entry '{spec}': expected one of {', '.join(BUILTIN_METRICS)} or "
                        "NAME=module:function")
    return name, target


def load_function(target: str) -> Callable[[dict[str, np.ndarray]], int]:
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"metric function '{target}': cannot import it ({err})") from None
    if not callable(fn):
        raise UserError(f"metric function '{target}': not callable")
    return fn


# --------------------------------------------------------------------------------------------------
# Map: one task per chunk of rows, in worker processes.

class _Task(NamedTuple):
    data: str
    seq_len: int
    start: int
    stop: int
    metrics: tuple[tuple[str, str | None], ...]  # (name, target); VOCAB_FREQ alone for the frequency pass
    out: str  # map directory
    chunk: int
    vocab_freq: str | None  # total_vocab_freq.npy for vocab_rarity


_ROWS: dict[tuple[str, int], PackedRows] = {}


def _rows(data: str, seq_len: int) -> PackedRows:
    key = (data, seq_len)
    if key not in _ROWS:
        _ROWS[key] = PackedRows(TokenShards(data), seq_len, continue_positions=False)
    return _ROWS[key]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _map_chunk(task: _Task) -> int:
    rows = _rows(task.data, task.seq_len)
    out = Path(task.out)
    if task.metrics == ((VOCAB_FREQ, None),):
        vocab = rows.shards.vocab_size
        freq = np.zeros(vocab, np.int64)
        for i in range(task.start, task.stop):
            freq += np.bincount(row_tokens(rows[i]), minlength=vocab)
        _save_atomic(out / VOCAB_FREQ / f"chunk_{task.chunk:06d}.npy", freq)
        return task.chunk
    log_p = log_probabilities(np.load(task.vocab_freq)) if task.vocab_freq else None
    functions = {name: (load_function(target) if target else None) for name, target in task.metrics}
    values = {name: np.zeros(task.stop - task.start, np.int64) for name in functions}
    for i in range(task.start, task.stop):
        row = rows[i]
        for name, fn in functions.items():
            value = vocab_rarity(row, log_p) if fn is None else fn(row)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise UserError(f"metric '{name}': returned {value!r} for row {i}; expected an integer")
            values[name][i - task.start] = value
    for name, array in values.items():
        _save_atomic(out / name / f"chunk_{task.chunk:06d}.npy", array)
    return task.chunk


def _watch_parent(parent: int) -> None:
    """Worker initializer: exit when the analyzer process is gone (killed), instead of lingering."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _fault(done: int) -> None:
    """Test hook: JAXLLM_FAULT=analyze_after_chunks:N kills the analyzer after N chunks were mapped."""
    if os.environ.get("JAXLLM_FAULT") == f"analyze_after_chunks:{done}":
        os.kill(os.getpid(), signal.SIGKILL)


def _run_map(tasks: list[_Task], workers: int, log: Callable[[str], None]) -> None:
    missing = [t for t in tasks
               if any(not (Path(t.out) / name / f"chunk_{t.chunk:06d}.npy").exists() for name, _ in t.metrics)]
    names = ",".join(name for name, _ in tasks[0].metrics)
    log(f"map {names}: {len(tasks) - len(missing)} of {len(tasks)} chunks already done, {len(missing)} to go "
        f"with {workers} worker(s)")
    for name, _ in tasks[0].metrics:
        (Path(tasks[0].out) / name).mkdir(parents=True, exist_ok=True)
    done = 0
    if workers == 1:
        for task in missing:
            _map_chunk(task)
            done += 1
            _fault(done)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_watch_parent,
                                                initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_map_chunk, task) for task in missing]
        for future in concurrent.futures.as_completed(futures):
            future.result()
            done += 1
            _fault(done)


# --------------------------------------------------------------------------------------------------
# Reduce.

def _chunks(map_dir: Path, name: str, count: int) -> list[np.ndarray]:
    return [np.load(map_dir / name / f"chunk_{c:06d}.npy") for c in range(count)]


def _ragged(groups: list[np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(groups) + 1, np.int64)
    offsets[1:] = np.cumsum([g.size for g in groups])
    data = np.concatenate(groups).astype(dtype) if groups else np.zeros(0, dtype)
    return data, offsets


def reduce_metric(values: np.ndarray, out: Path, manifest: dict[str, Any]) -> None:
    """Writes the index files of one metric from its per-sample `values` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric.json").unlink(missing_ok=True)
    sample_dtype = fit_int_dtype(0, max(values.size - 1, 0))
    _save_atomic(out / "sample_to_metric.npy", values.astype(fit_int_dtype(int(values.min()), int(values.max()))))
    order = np.argsort(values, kind="stable")  # samples grouped by value, ascending ids within a value
    unique, counts = np.unique(values, return_counts=True)
    groups = np.split(order, np.cumsum(counts)[:-1])
    _save_atomic(out / "index_to_metric.npy", unique.astype(fit_int_dtype(int(unique[0]), int(unique[-1]))))
    data, offsets = _ragged(groups, sample_dtype)
    _save_atomic(out / "index_to_sample.npy", data)
    _save_atomic(out / "index_to_sample.offsets.npy", offsets)
    per = max(1, unique.size // 100)
    merged = [np.concatenate(groups[i:i + per]) for i in range(0, len(groups), per)]
    data, offsets = _ragged(merged, sample_dtype)
    _save_atomic(out / "index_to_sample_percentile_merged.npy", data)
    _save_atomic(out / "index_to_sample_percentile_merged.offsets.npy", offsets)
    cumulative = np.cumsum(counts)
    percentiles = {str(p): int(unique[min(int(np.searchsorted(cumulative, values.size * p / 100.0)),
                                          unique.size - 1)]) for p in range(5, 101, 5)}
    manifest = {**manifest, "num_values": int(unique.size), "min_value": int(unique[0]),
                "max_value": int(unique[-1]), "percentiles": percentiles}
    write_atomic(out / "metric.json", [json.dumps(manifest, indent=1) + "\n"])


def _done(path: Path, manifest: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in manifest.items())


def analyze(data: str | os.PathLike, seq_len: int, out: str | os.PathLike, metrics: list[str],
            workers: int = 1, chunk_rows: int = 4096, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Maps and reduces `metrics` over the rows of `data`; returns each metric's index directory."""
    data, out = Path(data).resolve(), Path(out)
    if seq_len <= 0 or chunk_rows <= 0 or workers <= 0:
        raise UserError(f"--seq-len {seq_len}, --chunk-rows {chunk_rows}, --workers {workers}: expected positive "
                        "integers")
    rows = PackedRows(TokenShards(data), seq_len, continue_positions=False)
    if len(rows) == 0:
        raise UserError(f"{data}: holds no rows of {seq_len} tokens")
    parsed = [resolve_metric(m) for m in metrics]
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names) or not names:
        raise UserError(f"--metrics: got {metrics}; expected distinct metric names, at least one")
    for _, target in parsed:
        if target:
            load_function(target)  # fail early and clearly, before any worker starts
    fingerprint = dataset_fingerprint(data, seq_len)
    base = {"fingerprint": fingerprint, "num_samples": len(rows), "seq_len": seq_len, "data": str(data)}
    map_dir = out / MAP_DIR
    job = {**base, "chunk_rows": chunk_rows}
    out.mkdir(parents=True, exist_ok=True)
    if map_dir.exists() and not _done(map_dir / "job.json", job):
        shutil.rmtree(map_dir)  # chunks from another dataset or chunking cannot be reused
    map_dir.mkdir(exist_ok=True)
    (map_dir / "job.json").write_text(json.dumps(job))
    bounds = [(s, min(s + chunk_rows, len(rows))) for s in range(0, len(rows), chunk_rows)]

    def tasks(metric_list, freq=None):
        return [_Task(str(data), seq_len, s, e, tuple(metric_list), str(map_dir), c, freq)
                for c, (s, e) in enumerate(bounds)]

    freq_path = out / f"{VOCAB_FREQ}.npy"
    if "vocab_rarity" in names and not _done(out / f"{VOCAB_FREQ}.json", base):
        _run_map(tasks([(VOCAB_FREQ, None)]), workers, log)
        freq = np.sum(_chunks(map_dir, VOCAB_FREQ, len(bounds)), axis=0)
        _save_atomic(freq_path, freq)
        write_atomic(out / f"{VOCAB_FREQ}.json", [json.dumps(base)])
    todo = [(n, t) for n, t in parsed if not _done(out / n / "metric.json", {**base, "metric": n})]
    if todo:
        _run_map(tasks(todo, str(freq_path) if "vocab_rarity" in dict(todo) else None), workers, log)
        for name, _ in todo:
            values = np.concatenate(_chunks(map_dir, name, len(bounds)))
            reduce_metric(values, out / name, {**base, "metric": name})
            log(f"reduce {name}: {values.size} samples, {np.unique(values).size} distinct values -> {out / name}")
    shutil.rmtree(map_dir, ignore_errors=True)
    return {name: out / name for name in names}


# --------------------------------------------------------------------------------------------------
# Reading an index back.

class MetricIndex(NamedTuple):
    """One metric's index, as the curriculum sampler reads it."""

    name: str
    directory: Path
    sample_to_metric: np.ndarray  # [num_samples]
    index_to_metric: np.ndarray  # [num_values], ascending
    index_to_sample: np.ndarray  # samples ordered by value (ascending ids within a value)
    offsets: np.ndarray  # [num_values + 1] row bounds into index_to_sample


def metric_directory(path: str | os.PathLike) -> Path:
    """A metric's directory from itself or from one of its files (DeepSpeed's `index_to_sample_path`)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def open_metric_index(path: str | os.PathLike, fingerprint: str | None = None, where: str = "metric index"
                      ) -> MetricIndex:
    """Loads a metric index; with `fingerprint`, refuses an index built for other data or another row length."""
    directory = metric_directory(path)
    manifest_path = directory / "metric.json"
    if not manifest_path.is_file():
        raise UserError(f"{where}: '{manifest_path}' not found; build the index with python -m jaxllm.data.analyze")
    manifest = json.loads(manifest_path.read_text())
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise UserError(f"{where}: '{directory}' was built for different data (fingerprint "
                        f"{manifest.get('fingerprint')}, seq_len {manifest.get('seq_len')}, data "
                        f"{manifest.get('data')}); this run's data has fingerprint {fingerprint}. Rerun "
                        "python -m jaxllm.data.analyze on this run's data.seq_len and token directory")
    return MetricIndex(manifest["metric"], directory, np.load(directory / "sample_to_metric.npy"),
                       np.load(directory / "index_to_metric.npy"), np.load(directory / "index_to_sample.npy"),
                       np.load(directory / "index_to_sample.offsets.npy"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.data.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="token shard directory (python -m jaxllm.data.prepare)")
    parser.add_argument("--seq-len", type=int, required=True, help="row length; the run's data.seq_len")
    parser.add_argument("--out", required=True, help="index directory")
    parser.add_argument("--metrics", default="vocab_rarity",
                        help="comma-separated: vocab_rarity and/or NAME=module:function")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--chunk-rows", type=int, default=4096, help="rows per map task (the restart unit)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return exit_status(lambda: analyze(args.data, args.seq_len, args.out, metrics, args.workers, args.chunk_rows))


if __name__ == "__main__":
    sys.exit(main())
