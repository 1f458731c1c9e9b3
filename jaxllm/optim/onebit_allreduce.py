"""Error-feedback 1-bit all-reduce (DeepSpeed's `compressed_allreduce`), run inside `jax.shard_map`.

Each of the W devices on `axis_name` holds a flat f32 vector `x` of length n. The collective returns
(approximately) their average while only packed sign bits (8 per byte) and f32 scales cross devices:

1. Pad to `n_pad`, a multiple of `W * lcm(W, 8)`; the worker error `e_w` has n_pad entries and the
   server error `e_s` has n_pad / W.
2. Worker: `b = pad(x) + e_w`; `s = ||b||_2 / sqrt(n_pad)` (RMS); `sign(b)` in {-1, +1} with the
   sign of 0 taken as +1; `e_w = b - s * sign(b)`.
3. Phase 1: the signs are packed MSB first (bit 1 means b >= 0) and cut into W chunks; chunk j goes
   to device j (`all_to_all`), and every device receives every scale (`all_gather`).
4. Server (device j, chunk j): `m = sum_i sign_i * s_i / W + e_s`; `ss = RMS(m)`;
   `e_s = m - ss * sign(m)`.
5. Phase 2: `all_gather` of the server signs (packed) and of `ss`; the output is the concatenation of
   `ss_j * sign_j`, cut back to n entries (the padded tail is discarded).

Per device this moves about n/8 bytes in each phase instead of the 8n bytes of an f32 ring all-reduce.
The error buffers are per-device state: under `shard_map` they enter and leave with a spec that names
the data axis. Seide et al. 2014 (1-bit SGD), Tang et al. 2021 "1-bit Adam" (arXiv:2102.02888).

`compressed_allreduce_tree` does the same for several vectors at once (each with its own scale,
padding and error buffers, exactly as if reduced one by one) but fuses their traffic into one
all-to-all and three all-gathers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, UInt8

# The manual mesh axis over which jaxllm's compressed train step runs the optimizer (see
# `jaxllm.engine.onebit`); `jaxllm.optim.build_optimizer` hands it to the 1-bit optimizers.
DEVICE_AXIS = "dp"


class CompressionState(NamedTuple):
    """Error-feedback buffers of one device for one compressed vector."""

    worker_error: Float[Array, " n_pad"]  # what this device's 1-bit code left out, fed back next round
    server_error: Float[Array, " chunk"]  # the same for the chunk this device reduces as a server


def padded_size(n: int, world_size: int) -> int:
    """DeepSpeed's padding rule: the smallest multiple of `W * lcm(W, 8)` that holds n entries.

    >>> padded_size(10, 2), padded_size(64, 8), padded_size(65, 3)
    (16, 64, 72)
    """
    if n < 0 or world_size < 1:
        raise ValueError(f"padded_size: need n >= 0 and world_size >= 1, got n={n}, world_size={world_size}")
    unit = world_size * math.lcm(world_size, 8)
    return -(-n // unit) * unit


def init_compression_state(n: int, world_size: int) -> CompressionState:
    """Zero worker error of `padded_size(n, W)` entries and zero server error of that size / W."""
    size = padded_size(n, world_size)
    return CompressionState(jnp.zeros((size,), jnp.float32), jnp.zeros((size // world_size,), jnp.float32))


def pack_signs(bits: Bool[Array, " n"]) -> UInt8[Array, " n//8"]:
    """Packs booleans 8 per byte, most significant bit first (as `numpy.packbits`); n % 8 == 0."""
    if bits.shape[-1] % 8:
        raise ValueError(f"pack_signs: the last axis ({bits.shape[-1]}) must be a multiple of 8")
    groups = bits.reshape(*bits.shape[:-1], -1, 8).astype(jnp.uint8)
    weights = jnp.left_shift(jnp.uint8(1), jnp.arange(7, -1, -1, dtype=jnp.uint8))
    return jnp.sum(groups * weights, axis=-1, dtype=jnp.uint8)


def unpack_signs(packed: UInt8[Array, " m"]) -> Float[Array, " m*8"]:
    """Inverse of `pack_signs` as f32 signs: bit 1 -> +1.0, bit 0 -> -1.0."""
    shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)
    bits = jnp.right_shift(packed[..., None], shifts) & jnp.uint8(1)
    signs = bits.astype(jnp.float32) * 2.0 - 1.0
    return signs.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def world_size(axis_name: str | None) -> int:
    """Size of the named (manual) mesh axis; 1 without one."""
    return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _signs(bits: jax.Array) -> jax.Array:
    return jnp.where(bits, jnp.float32(1.0), jnp.float32(-1.0))


def _check(n: int, state: CompressionState, world: int, index: int) -> None:
    want = padded_size(n, world)
    if state.worker_error.shape != (want,) or state.server_error.shape != (want // world,):
        raise ValueError(
            f"compressed_allreduce: vector {index} has {n} entries and the axis has {world} devices, so the "
            f"error buffers must have shapes ({want},) and ({want // world},); got {state.worker_error.shape} and "
            f"{state.server_error.shape} (build them with init_compression_state({n}, {world}))"
        )


def _layout(sizes: Sequence[int], world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Static index arrays that fuse several padded vectors into one exchange.

    The vectors, each padded to p_l and cut into W chunks of c_l = p_l / W, are laid end to end in a
    flat buffer of N = sum p_l entries. Row j of the [W, C] (C = N / W) send buffer holds chunk j of
    every vector in turn. Returns (segment of each flat entry [N], flat index of each send-buffer
    entry [W, C], segment of each send-buffer column [C], padded sizes).
    """
    padded = [padded_size(n, world) for n in sizes]
    chunks = [p // world for p in padded]
    starts = np.cumsum([0, *padded[:-1]])
    segment = np.repeat(np.arange(len(sizes)), padded)
    columns = [starts[k] + j * chunks[k] + np.arange(chunks[k]) for k in range(len(sizes)) for j in range(world)]
    gather = np.stack([np.concatenate([columns[k * world + j] for k in range(len(sizes))]) for j in range(world)])
    column_segment = np.repeat(np.arange(len(sizes)), chunks)
    return segment, gather, column_segment, padded


def _segment_rms(values: jax.Array, segment: np.ndarray, lengths: Sequence[int]) -> jax.Array:
    sums = jax.ops.segment_sum(jnp.square(values), segment, num_segments=len(lengths), indices_are_sorted=True)
    return jnp.sqrt(sums) / np.sqrt(np.asarray(lengths, np.float32))


def compressed_allreduce_tree(
    xs: Sequence[Float[Array, " n"]], states: Sequence[CompressionState], axis_name: str | None
) -> tuple[list[jax.Array], list[CompressionState]]:
    """`compressed_allreduce` of several flat vectors with fused communication.

    The result equals reducing each vector separately (each keeps its own RMS scales, padding and
    error buffers) up to float rounding of the scales; only the work is shared: one all-to-all of all
    packed sign chunks, one all-gather of the [len(xs)] worker scales, one of the packed server signs
    and one of the server scales, and array operations over all vectors at once. Outputs keep each
    input's dtype.
    """
    world = world_size(axis_name)
    if len(xs) != len(states):
        raise ValueError(f"compressed_allreduce_tree: {len(xs)} vectors but {len(states)} states")
    if not xs:
        return [], []
    for i, (x, state) in enumerate(zip(xs, states, strict=True)):
        if x.ndim != 1:
            raise ValueError(f"compressed_allreduce: vector {i} must be flat, got shape {x.shape}")
        _check(x.size, state, world, i)
    segment, gather, column_segment, padded = _layout([x.size for x in xs], world)
    chunks = [p // world for p in padded]

    # Worker side: compensate, scale, sign, new worker error, packed chunks.
    flat = jnp.concatenate([jnp.pad(x.astype(jnp.float32), (0, p - x.size)) + st.worker_error
                            for x, st, p in zip(xs, states, padded, strict=True)])
    scales = _segment_rms(flat, segment, padded)  # [vectors]
    bits = flat >= 0
    worker_error = flat - scales[segment] * _signs(bits)
    sendbuf = pack_signs(bits[gather])  # [W, C / 8]: row j is what device j reduces
    if axis_name is None:
        recv, all_scales = sendbuf, scales[None]
    else:
        recv = jax.lax.all_to_all(sendbuf, axis_name, 0, 0, tiled=True)  # row i: device i's chunk for me
        all_scales = jax.lax.all_gather(scales, axis_name)  # [W, vectors]

    # Server side: average the W decoded chunks, compensate, compress again.
    server_error = jnp.concatenate([st.server_error for st in states])
    m = jnp.sum(unpack_signs(recv) * (all_scales[:, column_segment] * np.float32(1.0 / world)), axis=0) + server_error
    server_scales = _segment_rms(m, column_segment, chunks)
    server_bits = m >= 0
    server_error = m - server_scales[column_segment] * _signs(server_bits)
    server_packed = pack_signs(server_bits)
    if axis_name is None:
        gathered, gathered_scales = server_packed[None], server_scales[None]
    else:
        gathered = jax.lax.all_gather(server_packed, axis_name)  # [W, C / 8]
        gathered_scales = jax.lax.all_gather(server_scales, axis_name)  # [W, vectors]
    rows = unpack_signs(gathered) * gathered_scales[:, column_segment]  # [W, C], laid out as the send buffer
    full = jnp.zeros(flat.shape, jnp.float32).at[gather.reshape(-1)].set(rows.reshape(-1), unique_indices=True)

    outputs, new_states = [], []
    start, server_start = 0, 0
    for x, p, c in zip(xs, padded, chunks, strict=True):
        outputs.append(full[start:start + x.size].astype(x.dtype))
        new_states.append(CompressionState(worker_error[start:start + p], server_error[server_start:server_start + c]))
        start, server_start = start + p, server_start + c
    return outputs, new_states


def compressed_allreduce(
    x: Float[Array, " n"], state: CompressionState, axis_name: str | None
) -> tuple[Float[Array, " n"], CompressionState]:
    """DeepSpeed's error-feedback 1-bit all-reduce of this device's flat vector `x` over `axis_name`.

    Call it inside `jax.shard_map` (manual over `axis_name`) with this device's `x` and its
    `CompressionState`; returns the decompressed average (the same on every device) and the updated
    state. With `axis_name=None` it runs the same arithmetic for a single worker (W = 1), no
    collectives. The algorithm and its traffic are in the module docstring.

    Example (4 devices):

        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((4,), ("d",))
        >>> def f(x, worker, server):
        ...     y, s = compressed_allreduce(x[0], CompressionState(worker[0], server[0]), "d")
        ...     return y[None], s.worker_error[None], s.server_error[None]
        >>> s = init_compression_state(1000, 4)
        >>> xs = jnp.ones((4, 1000)); we = jnp.zeros((4, *s.worker_error.shape))
        >>> se = jnp.zeros((4, *s.server_error.shape))
        >>> y, we, se = jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P("d"))(xs, we, se)
    """
    (y,), (new,) = compressed_allreduce_tree([x], [state], axis_name)
    return y, new
