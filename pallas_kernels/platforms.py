"""Which Pallas backend a kernel is built for, decided by the platform the program is compiled for.

A kernel's platform-specific choices (compiler parameters, block shapes, sometimes the kernel body)
are static arguments, so they must be fixed while tracing, yet the platform is only known when the
program is lowered: a program traced on a CPU host may be compiled for a TPU or an H100
(`jaxllm.aot`). `by_platform` therefore traces one variant per backend under
`lax.platform_dependent`, and lowering keeps only the variant of the platform being compiled for:

- "mosaic_tpu" on TPU (Mosaic; blocks obey the (8, 128) rule on their last two dimensions),
- "triton" on GPU (Triton; tiles are powers of two >= 16),
- "interpret" on CPU, which has no Pallas compiler (the Pallas interpreter; any block shape).

Importing this module needs neither a TPU nor a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jax import lax

from jaxllm.errors import UserError

BACKENDS = ("interpret", "mosaic_tpu", "triton")


def by_platform(kernel: Callable[..., Any], *args: Any, interpret: bool = False, backend: str | None = None,
                **static: Any) -> Any:
    """`kernel(*args, backend=..., **static)` with the backend of the platform being compiled for.

    `interpret=True` forces the interpreter everywhere (tests of a kernel body on any backend);
    `backend` forces one variant (its block shapes, parameters and kernel bodies) everywhere: under
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` the "mosaic_tpu" one runs on a CPU.
    """
    if interpret:
        return kernel(*args, backend="interpret", **static)
    if backend is not None:
        if backend not in BACKENDS:
            raise UserError(f"Pallas backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        return kernel(*args, backend=backend, **static)
    variant = {b: functools.partial(kernel, backend=b, **static) for b in BACKENDS}
    return lax.platform_dependent(*args, tpu=variant["mosaic_tpu"], cpu=variant["interpret"],
                                  default=variant["triton"])


def compiler_params(backend: str, *, parallel_axes: int, reduction_axes: int = 0, num_warps: int = 4,
                    num_stages: int = 2) -> Any:
    """Compiler parameters of one `pallas_call` for `backend` (None for the interpreter).

    Mosaic TPU is told which grid axes are independent ("parallel", may be split over a chip's cores)
    and which revisit the same output block ("arbitrary", the trailing reduction axes); Triton gets
    its launch parameters. Passing Triton parameters explicitly also keeps JAX from choosing Mosaic
    GPU, which these kernels are not written for.
    """
    if backend == "interpret":
        return None
    if backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel_axes
                                    + ("arbitrary",) * reduction_axes)
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    raise ValueError(f"unknown Pallas backend {backend!r}; expected one of {BACKENDS}")
