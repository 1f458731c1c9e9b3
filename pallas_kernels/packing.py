"""The byte layout of stored quantization codes: which bit widths exist and how many fit in a byte.

`quantized_matmul` reads codes in this layout and `jaxllm.compression.packing` writes them, so the
layout is defined here, beside the kernel, and the writer imports it. A code of 1-2 bits takes a 2-bit
field, 3-4 bits a 4-bit field, 5-8 bits a whole byte; a byte holds `8 / width` consecutive rows.
Plain Python (no Pallas import), so importing it costs nothing.
"""

from __future__ import annotations

from jaxllm.errors import UserError


def check_bits(bits: object, where: str = "bits") -> int:
    """Returns `bits` as an int, or raises UserError unless it is an integer in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"{where}: got {bits!r}; expected an integer from 1 to 8 (1 binary, 2 ternary, "
                        "3-8 symmetric or asymmetric)")
    return bits


def field_width(bits: int) -> int:
    """Storage bits per code: 2 for 1-2 bit codes, 4 for 3-4 bits, else 8."""
    bits = check_bits(bits)
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_rows(rows: int, bits: int) -> int:
    """Byte rows that hold `rows` code rows."""
    per = 8 // field_width(bits)
    return -(-rows // per)
