"""What every run does before and around its steps: start JAX's multi-controller runtime, point the
persistent compilation cache, decide which batch rows this process loads, turn host batches into
global arrays, and wait for the other processes.

Every task (pretraining, SFT, reward, PPO, VisualChat, compression) calls these; none of them is a
command-line module, so any module may import this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.errors import UserError

DIST_ENV = ("JAXLLM_COORDINATOR", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID")
T = TypeVar("T")


def _dist_from_env() -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the JAXLLM_* variables, or None if none is set."""
    found = {name: os.environ[name] for name in DIST_ENV if os.environ.get(name)}
    if not found:
        return None
    missing = [name for name in DIST_ENV if name not in found]
    if missing:
        raise UserError(f"environment variable '{missing[0]}': required when {', '.join(found)} is set")
    try:
        num_processes, process_id = int(found["JAXLLM_NUM_PROCESSES"]), int(found["JAXLLM_PROCESS_ID"])
    except ValueError:
        raise UserError(f"environment variables {DIST_ENV[1]}/{DIST_ENV[2]}: expected integers, got "
                        f"{found['JAXLLM_NUM_PROCESSES']!r}/{found['JAXLLM_PROCESS_ID']!r}") from None
    if not 0 <= process_id < num_processes:
        raise UserError(f"environment variable 'JAXLLM_PROCESS_ID': got {process_id}; expected an integer "
                        f"in [0, JAXLLM_NUM_PROCESSES={num_processes})")
    return found["JAXLLM_COORDINATOR"], num_processes, process_id


def init_distributed(config: Any) -> None:
    """Starts JAX's multi-controller runtime when the config or the environment asks for it.

    In order of precedence: `distributed.auto=true` lets JAX discover the cluster itself (Cloud TPU,
    SLURM, Open MPI); `distributed.coordinator` with `num_processes` and `process_id`; the variables
    JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES and JAXLLM_PROCESS_ID (all three); else one process.
    """
    dist = config.distributed
    coordinator, num_processes, process_id = dist.coordinator, dist.num_processes, dist.process_id
    if not dist.auto and not coordinator and (env := _dist_from_env()):
        coordinator, num_processes, process_id = env
    if dist.auto:
        try:
            jax.distributed.initialize()
        except ValueError as err:  # JAX found no cluster environment to read the coordinator from
            raise UserError(f"config key 'distributed.auto': jax.distributed.initialize() failed: {err}") from None
    elif coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif dist.num_processes > 1:
        raise UserError("config key 'distributed.coordinator': required (HOST:PORT) when "
                        f"distributed.num_processes={dist.num_processes} (or set {', '.join(DIST_ENV)}, "
                        "or distributed.auto=true)")


def compile_cache_dir(config: Any) -> str | None:
    """Where XLA's persistent compilation cache lives for this run, or None when it is off.

    `train.compile_cache` left at its default defers to $JAX_COMPILATION_CACHE_DIR when that is set
    (tests and shared clusters redirect the cache with it); null or "" turns the cache off.
    """
    path = config.train.compile_cache
    if path == config_lib.DEFAULT_COMPILE_CACHE and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    return str(Path(path).expanduser()) if path else None


def setup_compile_cache(config: Any) -> str | None:
    """Points the persistent compilation cache at `compile_cache_dir(config)`; returns that directory.

    Every program is cached, however small or quick to compile: a start compiles several small ones
    (initialisation, the peak-FLOPs matmul, dtype conversions) besides the train step, and on CPU they
    add up to seconds.
    """
    path = compile_cache_dir(config)
    if path != getattr(jax.config, "jax_compilation_cache_dir", None):
        from jax.experimental.compilation_cache import compilation_cache

        # JAX opens the cache once, on the first compilation; a new location needs a fresh start.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    if path:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def make_directory(path: str | os.PathLike, what: str = "--workdir") -> Path:
    """Creates `path` (and its parents) if needed; a file in its place or above it, or a directory that
    cannot be created, is a UserError naming `what` (the flag or key that gave the path)."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise UserError(f"{what} {path}: '{part}' is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what} {path}: cannot create it ({err.strerror})") from None
    return path


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Holds `WORKDIR/.lock` while a run uses the workdir (process 0 holds it for all processes): a
    second run on the same workdir is refused with the process that holds it, instead of the two
    overwriting each other's checkpoints and metrics. The operating system drops the lock when its
    process ends, so a killed run never leaves it stuck."""
    workdir = make_directory(workdir)
    if not is_lead():
        yield workdir
        return
    stream = (workdir / ".lock").open("a+")
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.seek(0)
        holder = stream.read().strip() or "another process"
        stream.close()
        raise UserError(f"--workdir {workdir}: in use by {holder}; wait for that run to end or use another "
                        "--workdir") from None
    stream.seek(0)
    stream.truncate()
    stream.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    stream.flush()
    try:
        yield workdir
    finally:
        fcntl.flock(stream, fcntl.LOCK_UN)
        stream.close()


def start(config: Any) -> Mesh:
    """The compilation cache, the multi-controller runtime, then the run's mesh (`config.mesh`)."""
    setup_compile_cache(config)
    init_distributed(config)
    return mesh_lib.make_mesh(config.mesh)


def is_lead() -> bool:
    """Whether this process writes the run's files (metrics, prepared data)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def lead_first(prepare: Callable[[], T], what: str) -> T:
    """`prepare()` on process 0, then on the others once it has succeeded (it finds the files process 0
    wrote). A broadcast instead of a bare barrier: if process 0 fails, the others stop at once with a
    clear error instead of failing later in a collective timeout."""
    result, failure = None, None
    if is_lead():
        try:
            result = prepare()
        except Exception as err:  # re-raised below, once the other processes know
            failure = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
        if not ok and not is_lead():
            raise UserError(f"process 0 failed to prepare {what}; see its output")
        if not is_lead():
            result = prepare()
    if failure is not None:
        raise failure
    return result


def check_rows_divide(rows: int, mesh: Mesh, key: str, grad_accum: int = 1) -> None:
    """A global batch of `rows` (split into `grad_accum` micro-batches) must divide over the data shards
    and the processes; `key` is the config key that set it."""
    shards, micro = mesh_lib.data_parallel_size(mesh), rows // grad_accum
    if micro * grad_accum != rows or micro % shards:
        per = f" / train.grad_accum {grad_accum} = {micro}" if grad_accum > 1 else ""
        raise UserError(f"config key '{key}': {rows}{per} rows per micro-batch do not divide over the {shards} data "
                        f"shards (mesh.data x mesh.fsdp); use a multiple of {shards * grad_accum}")
    if rows % jax.process_count():
        raise UserError(f"config key '{key}': {rows} does not divide over {jax.process_count()} processes")


def check_batch(config: Any, mesh: Mesh) -> None:
    """A language-model run's batch (`train.batch_size`, `train.grad_accum`, `data.seq_len`) and heads
    fit the mesh: rows over the data shards and processes, length over the sequence axis, and heads for
    Ulysses attention."""
    check_rows_divide(config.train.batch_size, mesh, "train.batch_size", config.train.grad_accum)
    if config.data.seq_len % mesh.shape["sequence"]:
        raise UserError(f"config key 'data.seq_len': {config.data.seq_len} does not divide over "
                        f"mesh.sequence={mesh.shape['sequence']}")
    mesh_lib.check_attention_heads(config.model.heads, dict(mesh.shape))


def data_slot(mesh: Mesh, shape: tuple[int, ...]) -> tuple[int, int]:
    """(slot, slots): which of the disjoint row blocks of a global batch of `shape` this process loads.

    Processes whose devices hold the same batch rows (a tensor or sequence axis spanning hosts) share
    a slot and so load identical rows, as `make_array_from_process_local_data` requires of replicas;
    slicing by process index instead would silently feed them different data.
    """
    rows: dict[int, set[int]] = {}
    for device, index in mesh_lib.batch_sharding(mesh, len(shape)).devices_indices_map(shape).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(shape[0])))
    blocks = sorted({tuple(sorted(r)) for r in rows.values()})
    mine = tuple(sorted(rows[jax.process_index()]))
    if len(blocks) * len(mine) != shape[0] or len(set().union(*blocks)) != shape[0]:
        raise UserError(f"config key 'mesh': the batch axes do not split the {shape[0]} batch rows evenly "
                        "between processes; order the mesh so each host holds whole data/fsdp shards")
    return blocks.index(mine), len(blocks)


def rows_sharding(mesh: Mesh, ndim: int, split_length: bool = False) -> NamedSharding:
    """Batch arrays split by rows over the data-parallel axes; with `split_length` a `[rows, length, ...]`
    array is also split by length over the sequence axis (Ulysses)."""
    if split_length and ndim >= 2:
        return mesh_lib.batch_sharding(mesh, ndim)
    return NamedSharding(mesh, mesh_lib.logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, rows: int, split_length: bool = False
              ) -> dict[str, jax.Array]:
    """A host batch (this process's rows) as global arrays of `rows` rows (see `rows_sharding`).

    The global shape is explicit: inferring it would be wrong when processes hold replicated rows."""
    return {name: jax.make_array_from_process_local_data(rows_sharding(mesh, value.ndim, split_length), value,
                                                         (rows, *value.shape[1:]))
            for name, value in batch.items()}
