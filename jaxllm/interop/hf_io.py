"""Safetensors files of a Hugging Face directory: validated reading, block by block, and atomic writing.

`HFCheckpoint` opens a directory and checks it before any weight is read: a config.json, safetensors
only (pickle files are refused, never opened), every shard the index lists present and holding the
tensors the index places there, float dtypes, and (in `check`) exactly the tensor names and shapes of
the family's layout. `read_block` reads the part of one tensor that one device's slice of one jaxllm
parameter needs. `write_directory` writes shards and an index into a temporary directory and renames
it into place, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes  # registers numpy's bfloat16 so safetensors can return it
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.data.jsonl import new_file_mode
from jaxllm.errors import UserError
from jaxllm.interop import hf_layouts as layouts

try:
    from safetensors import safe_open
    from safetensors.numpy import save_file
except ImportError:  # pragma: no cover - safetensors is a core dependency; kept for a clear message
    safe_open = save_file = None

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.h5", "*.msgpack")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class HFCheckpoint:
    """A validated Hugging Face directory: its config.json and where each tensor lives.

    Opening checks that the directory holds safetensors (refusing pickle files), that every shard
    the index lists exists and holds the tensors the index says, and that each tensor's dtype is a
    float type. `check(cfg)` then matches names and shapes against the family's layout.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"Hugging Face checkpoint '{self.path}' is not a directory")
        self.config = read_config(self.path, "Hugging Face checkpoint")
        self.config_file = str(self.path / CONFIG)
        self.family = layouts.family_of(self.config, self.config_file)
        if safe_open is None:
            raise UserError("reading Hugging Face checkpoints needs the 'safetensors' package "
                            "(pip install safetensors)")
        # canonical name -> (file, name in the file)
        self.files = {layouts.canonical_name(name, self.family): where
                      for name, where in tensor_files(self.path, "Hugging Face checkpoint").items()}
        self.meta = self._headers()  # canonical name -> (shape, safetensors dtype)

    def _headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        meta = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for canonical, (file, name) in self.files.items():
            by_file.setdefault(file, []).append((canonical, name))
        for file, names in by_file.items():
            with open_safetensors(file) as f:
                present = set(f.keys())
                for canonical, name in names:
                    if name not in present:
                        raise UserError(f"'{self.path / INDEX}' places tensor '{name}' in '{file.name}', "
                                        f"but '{file}' does not hold it")
                    sl = f.get_slice(name)
                    meta[canonical] = (tuple(sl.get_shape()), sl.get_dtype())
        return meta

    def model_config(self, max_len: int | None = None, compute_dtype: str = "float32") -> ModelConfig:
        return layouts.model_config_from_hf(self.config, self.config_file, max_len, compute_dtype)

    def check(self, cfg: ModelConfig) -> dict[layouts.Path, layouts.View]:
        """Checks that the tensors are exactly those of `cfg`'s layout; returns the views."""
        views = layouts.views(cfg)
        expected = {view.tensor: view.hf_shape for view in views.values()}
        for name, shape in expected.items():
            if name not in self.meta:
                where = ", ".join(sorted({f.name for f, _ in self.files.values()}))
                raise UserError(f"Hugging Face checkpoint '{self.path}': tensor '{name}' is missing (searched {where})")
            check_tensor(*self.files[name], *self.meta[name], shape)
        for name in self.meta:
            if name not in expected and not layouts.is_ignored(name, self.family, cfg.tied):
                file, stored = self.files[name]
                raise UserError(f"tensor '{stored}' in '{file}' is not part of a "
                                f"{layouts.ARCHITECTURES[self.family]} with this '{CONFIG}' "
                                f"({cfg.layers} layers, tie_word_embeddings={cfg.tied})")
        return views

    @contextlib.contextmanager
    def readers(self) -> Iterator[Callable[[str, tuple[slice, ...]], np.ndarray]]:
        """Yields `read(name, slices)`, reading one block of one tensor from its memory-mapped file."""
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}

            def read(name: str, slices: tuple[slice, ...]) -> np.ndarray:
                file, stored = self.files[name]
                if file not in handles:
                    handles[file] = stack.enter_context(open_safetensors(file))
                return handles[file].get_slice(stored)[slices]

            yield read


def read_config(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`'s config.json; `what` names the checkpoint in errors."""
    file = path / CONFIG
    if not file.is_file():
        raise UserError(f"{what} '{path}': '{CONFIG}' is missing")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{file}' is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"'{file}': expected a JSON object at the top level")
    return config


def tensor_files(path: Path, what: str) -> dict[str, tuple[Path, str]]:
    """Tensor name -> (file, name) of the directory's safetensors (`model.safetensors`, or the shards its
    index lists, each checked to exist). Pickle files are refused, never opened; `what` names the
    checkpoint in errors."""
    index, single = path / INDEX, path / SINGLE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise UserError(f"'{index}' is not a safetensors index (a JSON object with a 'weight_map' "
                            "mapping tensor names to files)") from None
        files = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise UserError(f"'{index}': tensor '{name}' maps to {file!r}; expected a .safetensors "
                                "file name in the same directory")
            if not (path / file).is_file():
                raise UserError(f"'{index}' lists shard '{file}' (holding tensor '{name}'), but "
                                f"'{path / file}' does not exist")
            files[name] = (path / file, name)
        return files
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: (single, name) for name in f.keys()}
    pickled = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if pickled:
        raise UserError(f"{what} '{path}' holds only '{pickled[0]}', a pickle-based format that can execute "
                        "code when read; jaxllm reads safetensors only (re-save the model with "
                        "save_pretrained(..., safe_serialization=True))")
    raise UserError(f"{what} '{path}' has neither '{SINGLE}' nor '{INDEX}'")


def open_safetensors(file: Path) -> Any:
    """`safe_open` (numpy arrays, memory-mapped), with a corrupt header as a UserError."""
    try:
        return safe_open(str(file), framework="numpy")
    except Exception as err:  # the Rust reader raises its own error types
        raise UserError(f"'{file}' is not a readable safetensors file: {err}") from None


def check_tensor(file: Path, stored: str, shape: tuple[int, ...], dtype: str, expected: tuple[int, ...]) -> None:
    """A stored tensor must have the `expected` shape (what config.json implies) and a float dtype."""
    if shape != expected:
        raise UserError(f"tensor '{stored}' in '{file}' has shape {list(shape)}, but '{CONFIG}' implies "
                        f"{list(expected)}")
    if dtype not in DTYPES:
        raise UserError(f"tensor '{stored}' in '{file}' has dtype {dtype}; expected one of {', '.join(DTYPES)}")


def read_block(view: layouts.View, read: Callable, index: tuple[slice, ...],
                shape: tuple[int, ...]) -> np.ndarray:
    """The block `param[index]` of the jaxllm parameter described by `view` (f32).

    Only the rows of the Hugging Face tensor that the block needs are read. `shape` may exceed the
    view's parameter shape on a vocabulary axis; those entries are zero padding.
    """
    ranges = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
    sizes, kept, order = view.sub_sizes, view.kept, view.order
    wanted: dict[int, tuple[int, int]] = dict((axis, (k, k + 1)) for axis, k in view.take)
    for j, (start, stop) in enumerate(ranges):
        wanted[kept[order[j]]] = (start, stop)
    clipped = {a: (min(lo, sizes[a]), min(hi, sizes[a])) for a, (lo, hi) in wanted.items()}
    block_shape = tuple(hi - lo for lo, hi in ranges)
    if any(hi <= lo for lo, hi in clipped.values()):
        return np.zeros(block_shape, np.float32)

    hf_slices, view_shape, inner = [], [], []
    axis = 0
    for group in view.split:
        axes = list(range(axis, axis + len(group)))
        axis += len(group)
        rs = [clipped[a] for a in axes]
        strides = [math.prod(group[t + 1:]) for t in range(len(group))]
        # The first sub-axis that needs more than one index decides the contiguous range to read.
        first = next((t for t, (lo, hi) in enumerate(rs) if hi - lo != 1), len(rs) - 1)
        base = sum(rs[t][0] * strides[t] for t in range(first))
        hf_slices.append(slice(base + rs[first][0] * strides[first], base + rs[first][1] * strides[first]))
        view_shape += [1] * first + [rs[first][1] - rs[first][0]] + list(group[first + 1:])
        inner += [slice(None)] * (first + 1) + [slice(lo, hi) for lo, hi in rs[first + 1:]]
    block = np.asarray(read(view.tensor, tuple(hf_slices))).reshape(view_shape)[tuple(inner)]
    block = block.reshape([hi - lo for lo, hi in (clipped[a] for a in range(len(sizes)) if a in kept)])
    block = block.transpose(order).astype(np.float32)
    pad = [(0, want - got) for want, got in zip(block_shape, block.shape, strict=True)]
    return np.pad(block, pad) if any(p for _, p in pad) else block


def size_bytes(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise UserError(f"max_shard_size: got {size!r}; expected bytes as an integer or a string like '5GB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])


def check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"save target '{path}' exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"save target '{path}' is a non-empty directory; choose another path or pass overwrite=True "
                        "(--overwrite on the command line)")
    if not path.parent.is_dir():
        raise UserError(f"save target '{path}': parent directory '{path.parent}' does not exist")


def _commit(tmp: Path, path: Path) -> None:
    """Moves the finished temporary directory into place (replacing an old one last)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def write_directory(path: Path, config: dict[str, Any], tensors: list[tuple[str, Callable[[], np.ndarray], int]],
                    limit: int, files: dict[str, bytes] | None = None) -> None:
    """Writes config.json, `files` ({name: contents}, e.g. the tokenizer's) and `(name, build, nbytes)`
    tensors, split into files of at most `limit` bytes.

    One file is `model.safetensors`; more are `model-0000i-of-0000n.safetensors` with a
    `model.safetensors.index.json` (`metadata.total_size`, `weight_map`), as `transformers` names them.
    Each tensor is built only when its file is written. Everything goes to a temporary directory beside
    `path` that replaces `path` once complete; on any failure it is removed. Every file gets the mode of
    a new file (`new_file_mode`): safetensors creates its own as private (0600) temporary files.
    """
    if save_file is None:
        raise UserError("writing Hugging Face checkpoints needs the 'safetensors' package")
    shards: list[list[tuple[str, Callable, int]]] = [[]]
    used = 0
    for item in tensors:
        if shards[-1] and used + item[2] > limit:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += item[2]
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: build() for name, build, _ in shard}, str(tmp / file), metadata={"format": "pt"})
            weight_map.update({name: file for name, _, _ in shard})
        if len(shards) > 1:
            total = sum(n for _, _, n in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, contents in (files or {}).items():
            (tmp / name).write_bytes(contents)
        mode = new_file_mode()
        for file in tmp.iterdir():
            file.chmod(mode)
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
