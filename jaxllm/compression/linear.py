"""The compressed side of `jaxllm.ops.linear`: activation quantization, calibration, kernel choice.

A compressed weight (`jaxllm.compression.qtensor`) implements `jaxllm.ops.linear.Weight`: before it
multiplies, it quantizes the input activations if its spec asks (token-wise dynamic ranges, or the
static EMA range the weight carries), then multiplies by the quantized weight:

- `FakeQuantWeight`: `fake_quant(w)` in f32 (straight-through gradients; training, LKD, XTC);
- `QuantizedWeight`: the integer codes. On CPU (and with `implementation="xla"`) the codes are
  dequantized and multiplied in XLA; on GPU/TPU ("auto") or with "pallas" (`jaxllm.ops.dispatch`) the Pallas
  kernel of `pallas_kernels/quantized_matmul.py` multiplies int8 / packed int4 / packed 2-bit codes with
  per-group scales, and uses int8 x int8 products with per-token activation scales for symmetric
  8-bit weights and activations (W8A8).

Calibration: inside `with record_ranges() as ranges:` every static activation quantizer first
updates its range with the batch, `r <- 0.95 r + 0.05 (min, max)` (the first batch sets it), and
quantizes with the updated range, as DeepSpeed's static quantizer does in training mode; `ranges`
collects the new ranges by module name. Use it inside the traced function and return `ranges`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from jaxllm.compression.quantizers import ActRange

_state = threading.local()


@contextlib.contextmanager
def record_ranges(momentum: float = 0.95) -> Iterator[dict[str, ActRange]]:
    """Collects (and applies) EMA updates of static activation ranges while tracing a forward pass."""
    previous = getattr(_state, "recorder", None)
    ranges: dict[str, ActRange] = {}
    _state.recorder = (ranges, momentum)
    try:
        yield ranges
    finally:
        _state.recorder = previous


def active_recorder() -> tuple[dict[str, ActRange], float] | None:
    """(ranges collected so far, momentum) of the innermost `record_ranges`, or None outside one."""
    return getattr(_state, "recorder", None)
