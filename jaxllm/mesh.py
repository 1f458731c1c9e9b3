"""The device mesh and the one table that maps logical axis names to mesh axes.

Modules annotate parameters with logical names only (`("embed", "mlp")`). This module is the only
place that knows the mesh axes `data`, `fsdp`, `tensor` and `sequence`, and the pipeline's `stage` axis:
only `jaxllm.models.pipeline` splits work over it, and parameters are sharded over it like over `fsdp`
(so that stages split their memory). ZeRO stages are sharding
choices over `fsdp`: stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the
parameters; there is no separate code path for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import MeshConfig
from jaxllm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
# Pipeline stages: outermost in the device order (the slowest links carry only the activations that
# pass from stage to stage). A mesh without it (built by hand) has one stage.
STAGE_AXIS = "stage"
ALL_AXES = (STAGE_AXIS, *MESH_AXES)

# Logical axis -> mesh axes. Edit this table (not a model file) to change the parallel layout.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    # Parameters only; activations keep the model dimension whole. Over `stage` too, so that pipeline
    # stages split the memory of the weights and optimizer state (at every ZeRO stage); the step
    # regroups the blocks' weights by stage (`jaxllm.models.pipeline`).
    "embed": ("fsdp", STAGE_AXIS),
    # The slot axis of stacked block weights (`jaxllm.models.stacking`): each stage holds its blocks.
    "layers": (STAGE_AXIS,),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    # Inside attention (Ulysses): the sequence axis moves from the length to the heads, so each device
    # holds whole rows for a slice of the heads; the moves both ways are all-to-alls.
    "attn_length": (),
    "attn_heads": ("tensor", "sequence"),
    "attn_kv_heads": ("tensor", "sequence"),
    "vocab": ("tensor",),
    "head_dim": (),
    "positions": (),
    "norm": (),
}


def resolve_axis_sizes(config: MeshConfig, device_count: int) -> dict[str, int]:
    """Fills in the one axis set to -1 and checks that the sizes multiply to the device count."""
    sizes = {axis: getattr(config, axis) for axis in ALL_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    free = [axis for axis, size in sizes.items() if size == -1]
    if free:
        if device_count % fixed:
            raise UserError(
                f"config key 'mesh': fixed axes {sizes} multiply to {fixed}, which does not divide the "
                f"{device_count} devices"
            )
        sizes[free[0]] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise UserError(
            f"config key 'mesh': axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
            f"{device_count} devices; set one axis to -1 or make the product equal the device count"
        )
    return sizes


class PipelineSettings(NamedTuple):
    """How `jaxllm.models.pipeline` runs the blocks over the `stage` axis (`MeshConfig`'s keys)."""

    stages: int
    schedule: str = "gpipe"
    repeats: int = 1
    microbatches: int = 0  # 0: twice the stage count

    @classmethod
    def of(cls, config: MeshConfig, stages: int | None = None) -> PipelineSettings:
        """The settings `config`'s keys ask for (`stages`: the mesh's resolved stage count, when known)."""
        return cls(config.stage if stages is None else stages, config.pipeline_schedule, config.pipeline_repeats,
                   config.microbatches())


# The pipeline settings of each mesh `make_mesh` built, by its axis names and sizes (what `jit` and
# `shard_map` see, whatever the axis types): the model reads them while tracing under `jax.set_mesh`,
# without a config argument. Meshes of the same shape share an entry; the last one made wins.
_PIPELINES: dict[Any, PipelineSettings] = {}


def _pipeline_key(mesh: Any) -> tuple[tuple[str, int], ...]:
    return tuple(dict(mesh.shape).items())


def share_pipeline(mesh: Mesh, view: Mesh) -> None:
    """Gives `view`, another arrangement of `mesh`'s devices (the 1-bit step's, with its data axis
    renamed), `mesh`'s pipeline settings."""
    if _pipeline_key(mesh) in _PIPELINES:
        _PIPELINES[_pipeline_key(view)] = _PIPELINES[_pipeline_key(mesh)]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_axis_sizes(config, len(devices))
    shape = tuple(sizes[axis] for axis in ALL_AXES)
    device_array = np.asarray(devices).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(ALL_AXES)
    mesh = None
    if devices == list(jax.devices()):  # let JAX order devices for the interconnect (ICI/NVLink rings)
        try:
            mesh = jax.make_mesh(shape, ALL_AXES, axis_types=axis_types)
        except (ValueError, NotImplementedError):
            pass
    mesh = mesh or Mesh(device_array, ALL_AXES, axis_types=axis_types)
    _PIPELINES[_pipeline_key(mesh)] = PipelineSettings.of(config)
    return mesh


def pipeline_settings() -> PipelineSettings:
    """The pipeline of the current mesh (one stage without a mesh or a `stage` axis)."""
    mesh = _current_mesh()
    stages = 1 if mesh is None else dict(mesh.shape).get(STAGE_AXIS, 1)
    if stages == 1:
        return PipelineSettings(1)
    settings = _PIPELINES.get(_pipeline_key(mesh), PipelineSettings(stages))
    return settings._replace(microbatches=settings.microbatches or 2 * stages)


def one_replica_mesh(tensor: int = 1) -> Mesh:
    """One replica of the model (no data parallelism) on the first device, or split over the first
    `tensor` devices: how the compression pipeline and the readers of a trained model (generate, chat)
    run."""
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=tensor, sequence=1), jax.devices()[:tensor])


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    drop: Sequence[str] = (),
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec through `LOGICAL_RULES`.

    Mesh axes listed in `drop` are left out (used for ZeRO stages below 3). With `shape` and `mesh`,
    an axis whose size does not divide the dimension is left out, so odd sizes replicate instead of
    failing; a mesh axis is used at most once per array.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis '{name}' has no rule in jaxllm.mesh.LOGICAL_RULES")
        axes = []
        for axis in LOGICAL_RULES[name]:
            if axis in drop or axis in used:
                continue
            if mesh is None:
                if axis == STAGE_AXIS:  # a spec for no particular mesh names the axes every mesh has
                    continue
            else:
                size = dict(mesh.shape).get(axis, 1)  # meshes built by hand may lack `stage`
                if size == 1 or axis in getattr(mesh, "manual_axes", ()):  # inside the pipeline's shard_map
                    continue
                if shape is not None and shape[dim] % (size * math.prod(mesh.shape[a] for a in axes)):
                    continue
            axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def tree_shardings(
    mesh: Mesh, logical_tree: Any, shapes: Any, drop: Sequence[str] = ()
) -> Any:
    """NamedShardings for a tree of logical-axis tuples and the matching tree of shapes."""
    return jax.tree.map(
        lambda axes, shape: NamedSharding(mesh, logical_to_spec(axes, shape, mesh, drop)),
        logical_tree,
        shapes,
        is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
    )


def param_drop(zero_stage: int) -> tuple[str, ...]:
    """Mesh axes that parameters are *not* sharded over for this ZeRO stage."""
    return () if zero_stage >= 3 else ("fsdp",)


def grad_drop(zero_stage: int) -> tuple[str, ...]:
    return () if zero_stage >= 2 else ("fsdp",)


def opt_drop(zero_stage: int) -> tuple[str, ...]:
    return () if zero_stage >= 1 else ("fsdp",)


# Memory kinds of a device's memories (JAX's names): its own (HBM) and page-locked host memory, which
# the device reads and writes by DMA. Host offload places state in HOST and streams it through the step.
DEVICE_MEMORY = "device"
HOST_MEMORY = "pinned_host"


def check_host_memory(mesh: Mesh, key: str) -> None:
    """Refuses `key` when the mesh's devices cannot address host memory (the compile-only GPU targets
    of jax 0.10 describe none, and would silently keep everything on the device)."""
    device = mesh.devices.flat[0]
    try:
        kinds = {memory.kind for memory in device.addressable_memories()}
    except Exception:  # noqa: BLE001 -- a device without memory descriptions raises its own error types
        kinds = set()
    if HOST_MEMORY not in kinds:
        raise UserError(f"config key '{key}': the devices ({device.device_kind}) address no {HOST_MEMORY!r} "
                        f"memory here (memories: {sorted(kinds) or 'none described'}); set {key}=none")


def on_host(sharding: NamedSharding) -> NamedSharding:
    return sharding.with_memory_kind(HOST_MEMORY)


def _moved(tree: Any, shardings: Any, kind: str) -> Any:
    def move(x, sharding):
        if sharding.memory_kind != HOST_MEMORY:
            return x
        return jax.device_put(x, sharding.with_memory_kind(kind))

    return jax.tree.map(move, tree, shardings)


def to_device(tree: Any, shardings: Any) -> Any:
    """Inside `jit`: the leaves of `tree` whose `shardings` place them in host memory, copied into device
    memory with the same sharding (the other leaves as they are). XLA schedules the copies (DMA) beside
    the computation that needs them."""
    return _moved(tree, shardings, DEVICE_MEMORY)


def to_host(tree: Any, shardings: Any) -> Any:
    """Inside `jit`: the leaves that `shardings` place in host memory copied back there."""
    return _moved(tree, shardings, HOST_MEMORY)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays `[batch, length, ...]` split over the data-parallel axes and the sequence axis."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length") + (None,) * (ndim - 2), mesh=mesh))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in LOGICAL_RULES["batch"])


def _current_mesh():
    """The mesh set by `jax.set_mesh` (abstract inside `jit`), or None when there is no jaxllm mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; a no-op without one."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def _sizes(sizes: Mapping[str, int] | None) -> Mapping[str, int]:
    if sizes is None:
        mesh = _current_mesh()
        sizes = {} if mesh is None else dict(mesh.shape)
    return sizes


def shard_count(logical_name: str, sizes: Mapping[str, int] | None = None) -> int:
    """How many ways the mesh axes of `logical_name` split a dimension, for mesh axis `sizes` (default:
    the current mesh; 1 without one)."""
    sizes = _sizes(sizes)
    return math.prod(sizes.get(axis, 1) for axis in LOGICAL_RULES[logical_name])


def check_attention_heads(heads: int, sizes: Mapping[str, int] | None = None) -> None:
    """Ulysses sequence parallelism gives each device whole rows of `heads / (tensor x sequence)` heads.

    With `mesh.sequence` > 1 the query heads must split evenly; otherwise attention would silently run
    replicated over the sequence axis. `sizes` as in `shard_count`.
    """
    sizes = _sizes(sizes)
    sequence, degree = sizes.get("sequence", 1), shard_count("attn_heads", sizes)
    if sequence > 1 and heads % degree:
        raise UserError(
            f"config key 'model.heads': {heads} attention heads do not divide over mesh.sequence={sequence} x "
            f"mesh.tensor={sizes.get('tensor', 1)} = {degree} devices; Ulysses sequence parallelism splits "
            f"attention by heads, so use a multiple of {degree} heads or a smaller mesh.sequence"
        )
