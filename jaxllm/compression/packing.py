"""Integer storage of quantization codes: int8 bytes, and 4-bit or 2-bit fields packed into bytes.

Codes of a `[rows, ...]` array are packed along the first axis: with field width `w` (8, 4 or 2 bits)
each byte holds `8 / w` consecutive rows, the earliest row in the highest bits. At 4 bits that is
DeepSpeed's INT4 layout (two codes per byte, even index in the high nibble). Signed codes are stored
as two's complement fields; unsigned (asymmetric) codes as plain fields. The last byte row is padded
with zero codes when `rows` does not divide evenly.

| bits   | codes                    | field width | bytes per code |
|--------|--------------------------|-------------|----------------|
| 5..8   | int8 (signed) / uint8    | 8           | 1              |
| 3..4   | 4-bit fields             | 4           | 1/2            |
| 1..2   | 2-bit fields ({-1, 0, 1}) | 2          | 1/4            |

Example::

    >>> pack_codes(jnp.array([[1], [-2], [7]]), bits=4, signed=True)      # 0x1e, then 7 and a 0 pad
    Array([[ 30], [112]], dtype=uint8)
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Integer

# The layout (bit widths, field widths, rows per byte) is the kernel's; this module writes and reads it.
from pallas_kernels.packing import field_width, packed_rows

__all__ = ["field_width", "gather_rows", "pack_codes", "packed_rows", "split_fields", "unpack_codes"]


def _shifts(width: int) -> jnp.ndarray:
    per = 8 // width
    return jnp.asarray([8 - width * (i + 1) for i in range(per)], jnp.int32)


def pack_codes(codes: Integer[Array, "rows ..."], bits: int, signed: bool) -> Integer[Array, "packed ..."]:
    """Codes (any integer or integer-valued float array) -> storage bytes packed along axis 0.

    8-bit fields return int8 (signed) or uint8 codes unchanged in value; narrower fields return uint8.
    """
    width = field_width(bits)
    if width == 8:
        return codes.astype(jnp.int8 if signed else jnp.uint8)
    per = 8 // width
    rows, rest = codes.shape[0], codes.shape[1:]
    c = codes.astype(jnp.int32) & ((1 << width) - 1)
    c = jnp.pad(c, [(0, (-rows) % per)] + [(0, 0)] * len(rest)).reshape(-1, per, *rest)
    shifts = _shifts(width).reshape((1, per) + (1,) * len(rest))
    return jnp.sum(c << shifts, axis=1).astype(jnp.uint8)


def unpack_codes(stored: Integer[Array, "packed ..."], bits: int, rows: int,
                 signed: bool) -> Integer[Array, "rows ..."]:
    """Inverse of `pack_codes`: int8 codes when `signed`, else uint8, with `rows` rows."""
    width = field_width(bits)
    dtype = jnp.int8 if signed else jnp.uint8
    if width == 8:
        return stored.astype(dtype)[:rows]
    per = 8 // width
    rest = stored.shape[1:]
    shifts = _shifts(width).reshape((1, per) + (1,) * len(rest))
    fields = (stored.astype(jnp.int32)[:, None] >> shifts) & ((1 << width) - 1)
    if signed:
        fields = jnp.where(fields >= 1 << (width - 1), fields - (1 << width), fields)
    return fields.reshape(-1, *rest)[:rows].astype(dtype)


def split_fields(stored: Integer[Array, "packed n"], bits: int, signed: bool) -> Integer[Array, "planes packed n"]:
    """The `8 / width` code planes of packed bytes: plane p holds the codes of rows `i * planes + p`.

    This is the kernel-side view of `unpack_codes` (no interleaving): `planes` arrays of the packed
    shape, signed as `signed`, as int32.
    """
    width = field_width(bits)
    if width == 8:
        return stored.astype(jnp.int32)[None]
    shifts = _shifts(width).reshape(-1, 1, 1)
    fields = (stored.astype(jnp.int32)[None] >> shifts) & ((1 << width) - 1)
    if signed:
        fields = jnp.where(fields >= 1 << (width - 1), fields - (1 << width), fields)
    return fields


def gather_rows(stored: Integer[Array, "packed n"], bits: int, index: Integer[Array, "*dims"],
                signed: bool) -> Integer[Array, "... n"]:
    """Code rows `index` of packed storage (an embedding lookup) without unpacking the other rows."""
    width = field_width(bits)
    dtype = jnp.int8 if signed else jnp.uint8
    if width == 8:
        return jnp.take(stored, index, axis=0).astype(dtype)
    per = 8 // width
    index = jnp.asarray(index, jnp.int32)
    shift = (8 - width * (index % per + 1))[..., None]
    fields = (jnp.take(stored, index // per, axis=0).astype(jnp.int32) >> shift) & ((1 << width) - 1)
    if signed:
        fields = jnp.where(fields >= 1 << (width - 1), fields - (1 << width), fields)
    return fields.astype(dtype)
