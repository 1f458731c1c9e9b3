"""How an op chooses between its XLA reference and its Pallas kernel: `implementation="auto"|"xla"|"pallas"`."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxllm.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def pallas_selected(op: str, implementation: str, platform: str | None = None,
                    auto_platforms: Sequence[str] = ("gpu", "tpu")) -> bool:
    """Whether `implementation` resolves to `op`'s Pallas kernel on `platform` (default: JAX's backend);
    "auto" picks the kernel on the platforms it is written for, `auto_platforms`."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"{op}: unknown implementation '{implementation}'; expected one of "
                        f"{', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return (platform or jax.default_backend()) in auto_platforms
    return implementation == "pallas"
