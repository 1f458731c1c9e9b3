"""What the matrix products of a compiled program multiply: operand and result element types, read from
the optimized HLO text (`compiled.as_text()`).

A product is a `dot`, a `convolution` (the TPU compiler writes matmuls as convolutions) or a GEMM
custom call (the GPU compiler's cuBLAS calls). Every instruction of the module, fused computations
included, is `%name = type[dims]{layout} opcode(%operand, ...)`, and names are unique in the module,
so each operand's type is looked up by its name. A quantized weight is *dequantized before its
product* when a product reads a floating-point array shaped like the weight's integer codes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

# `%name = f32[8,512]{1,0} opcode(...`, or a tuple result `%name = (f32[8,512]{1,0}, s8[1024]{0}) opcode(...`
# (a GEMM custom call returns its workspace too), of which the first element is the product.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\(?([a-z]\w*)\[([\d,]*)\][^ ]*(?:, [^=]*?\))?\s+"
                          r"([\w\-]+)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_GEMM_TARGET = re.compile(r'custom_call_target="([^"]*(?:gemm|matmul)[^"]*)"')
FLOATS = ("f16", "bf16", "f32", "f64", "f8e4m3fn", "f8e5m2")


@dataclasses.dataclass(frozen=True)
class Product:
    """One matrix product of the program: its operands' (type, dims) and its result type."""

    lhs: tuple[str, tuple[int, ...]]
    rhs: tuple[str, tuple[int, ...]]
    result: str

    @property
    def integer(self) -> bool:
        """int8 x int8 accumulated in int32."""
        return self.lhs[0] == "s8" and self.rhs[0] == "s8" and self.result == "s32"


def products(hlo_text: str) -> list[Product]:
    """Every dot, convolution and GEMM custom call of an HLO module's text, with its operand types."""
    types: dict[str, tuple[str, tuple[int, ...]]] = {}
    calls = []
    for line in hlo_text.splitlines():
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        name, dtype, dims, opcode, rest = found.groups()
        types[name] = (dtype, tuple(int(d) for d in dims.split(",") if d))
        if opcode in ("dot", "convolution") or (opcode == "custom-call" and _GEMM_TARGET.search(rest)):
            operands = _OPERAND.findall(rest)  # the two operands come first, then `calls=%...` and the like
            calls.append((dtype, operands[:2]))
    return [Product(types.get(lhs, ("?", ())), types.get(rhs, ("?", ())), result)
            for result, (lhs, rhs) in calls if (lhs, rhs)]


def weight_views(shapes: Iterable[tuple[int, int]], shards: int) -> set[tuple[int, ...]]:
    """The dims (sorted, without 1s) a `[K, N]` weight may have in a product on one device: whole, or
    split along either axis over `shards` devices."""
    views = set()
    for k, n in shapes:
        for dims in ((k, n), (k, n // shards), (k // shards, n)):
            views.add(tuple(sorted(d for d in dims if d > 1)))
    return views


def dequantized_products(found: Sequence[Product], views: set[tuple[int, ...]]) -> list[Product]:
    """The products that read a floating-point operand shaped like a quantized weight's codes."""
    def weight_like(operand):
        dtype, dims = operand
        return dtype in FLOATS and tuple(sorted(d for d in dims if d > 1)) in views

    return [p for p in found if weight_like(p.lhs) or weight_like(p.rhs)]
