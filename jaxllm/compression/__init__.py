"""Model compression: DeepSpeed's quantizers, ZeroQuant (PTQ + LKD) and XTC (binary/ternary + layer reduction).

Layers, from the numbers up (see docs/compression.md):

- `quantizers`: `fake_quant(x, bits, groups, symmetric)` and the activation quantizers, with
  straight-through gradients; `packing`: int8 / packed int4 / packed 2-bit code storage.
- `qtensor`: `FakeQuantWeight` (training) and `QuantizedWeight` (integer storage) pytrees with a
  static `QuantSpec`; both implement `jaxllm.ops.linear.Weight`, so the decoder's `linear` and
  `embedding_lookup` take them in place of arrays (XLA on CPU, `pallas_kernels/quantized_matmul.py`
  on GPU/TPU). `linear`: their activation quantization, `record_ranges` calibration and kernel choice.
- `rules`: regex rules over module paths -> per-module specs; DeepSpeed `compression_training` translator.
- `model`, `zeroquant`, `xtc`, `checkpoint`: whole-model transforms, PTQ and LKD, XTC training, and
  compressed checkpoints (imported on use: they depend on the decoder and the training code).

The command line is `python -m jaxllm.compress ptq|lkd|xtc|eval|generate ...`.
"""

from jaxllm.compression.linear import record_ranges
from jaxllm.compression.packing import pack_codes, unpack_codes
from jaxllm.compression.qtensor import FakeQuantWeight, QuantizedWeight, QuantSpec, quantize_weight
from jaxllm.compression.quantizers import ActRange, fake_quant, quantize_static, quantize_tokens, update_range
from jaxllm.compression.rules import Rule, from_deepspeed, plan
from jaxllm.ops.linear import embedding_lookup, linear  # re-exported: they lived here before jaxllm.ops

__all__ = ["ActRange", "FakeQuantWeight", "QuantSpec", "QuantizedWeight", "Rule", "embedding_lookup", "fake_quant",
           "from_deepspeed", "linear", "pack_codes", "plan", "quantize_static", "quantize_tokens", "quantize_weight",
           "record_ranges", "unpack_codes", "update_range"]
