"""How an op chooses between its XLA reference and its Pallas kernel: `implementation="auto"|"xla"|"pallas"`.

"auto" is decided by the platform the program is *compiled* for, not by the local backend: a step
traced on a CPU host and compiled for a TPU or a GPU (`jaxllm.aot`) gets the kernel. Under a mesh that
platform is its devices'; without one it is JAX's default backend. Only the chosen implementation is
traced (tracing a kernel that CPU runs would never use costs every CPU test its time). Under a mesh (`jax.set_mesh`)
the kernel runs inside `jax.shard_map`, each device on its own rows and heads: XLA cannot partition
a Mosaic kernel (it refuses) or a Triton one (it would all-gather the inputs and run it whole on
every device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from jaxllm.errors import UserError
from jaxllm.mesh import MESH_AXES, logical_to_spec

IMPLEMENTATIONS = ("auto", "xla", "pallas")
# JAX's platform names (what `jax.default_backend()` says) -> the names programs are lowered for.
LOWERING_PLATFORMS = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


def _check(op: str, implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"{op}: unknown implementation '{implementation}'; expected one of "
                        f"{', '.join(IMPLEMENTATIONS)}")


def pallas_selected(op: str, implementation: str, platform: str | None = None,
                    auto_platforms: Sequence[str] = ("gpu", "tpu")) -> bool:
    """Whether `implementation` resolves to `op`'s Pallas kernel on `platform` (default: JAX's backend);
    "auto" picks the kernel on the platforms it is written for, `auto_platforms`."""
    _check(op, implementation)
    if implementation == "auto":
        return (platform or jax.default_backend()) in auto_platforms
    return implementation == "pallas"


def dispatch(op: str, implementation: str, kernel: Callable[..., Any], reference: Callable[..., Any], *args: Any,
             auto_platforms: Sequence[str] = ("gpu", "tpu")) -> Any:
    """`kernel(*args)` or `reference(*args)` as `implementation` says; "auto" takes the kernel when the
    program is compiled for one of `auto_platforms` and the reference elsewhere (both must return the
    same shapes and dtypes)."""
    _check(op, implementation)
    if implementation == "auto":
        platform = mesh_platform() or jax.default_backend()
        kernel_platforms = {name for p in auto_platforms for name in (p, *LOWERING_PLATFORMS[p])}
        # Inside a `shard_map` already (pipeline stages) the kernels' own `shard_map` does not nest: the
        # reference runs there.
        mesh = jax.sharding.get_abstract_mesh()
        nested = mesh is not None and not mesh.empty and bool(mesh.manual_axes)
        implementation = "pallas" if platform in kernel_platforms and not nested else "xla"
    return (kernel if implementation == "pallas" else reference)(*args)


def mesh_platform() -> str | None:
    """The platform of the devices of the mesh set by `jax.set_mesh` ("cpu", "tpu", "cuda", ...; the
    program is compiled for them), or None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return getattr(getattr(mesh, "abstract_device", None), "platform", None)


def kernel_mesh() -> Any:
    """The mesh set by `jax.set_mesh` (abstract inside `jit`) when it names jaxllm's axes and spans
    several devices, else None (a kernel then runs as it is)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def logical_spec(mesh: Any, logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """`jaxllm.mesh.logical_to_spec` for an array of `shape`: axes that do not divide it (a broadcast
    axis of size 1, an odd batch) stay whole."""
    return logical_to_spec(logical_axes, shape, mesh)


def shard_kernel(kernel: Callable[..., Any], mesh: Any, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """`kernel` on each device's block of its inputs (`jax.shard_map`). Pallas outputs carry no record
    of which mesh axes they vary over, so that check is off; the specs say it instead."""
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
