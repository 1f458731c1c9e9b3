"""Causal self-attention over packed rows: segment masks, grouped-query heads, optional ALiBi.

`causal_attention_reference` is the definition in plain `jnp`; `causal_attention` dispatches on
`implementation` between it and the Pallas flash-attention kernel (`flash_attention`), which random-LTD's
token-dropped attention shares.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from jaxllm.ops.dispatch import dispatch, kernel_mesh, logical_spec, shard_kernel


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi head slopes for any head count (Press et al., 2022, "Train Short, Test Long").

    For n = 2^k heads the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8).
    Otherwise the first 2^floor(log2 n) slopes follow that rule and the rest are the odd-indexed
    terms of the sequence for twice that power of two, as BLOOM does.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(closest)
    if closest < num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def attention_mask(segment_ids: Int[Array, "b l"], token_index: Int[Array, "b l"] | None = None) -> jax.Array:
    """[b, 1, l, l] boolean: key j is visible to query i when j <= i in the same (non-padding) document.

    `token_index` orders the tokens instead of their slots (random-LTD's kept tokens keep their
    original sequence indices): then j is visible when `token_index[j] <= token_index[i]`.
    """
    length = segment_ids.shape[-1]
    if token_index is None:
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    else:
        causal = token_index[:, None, :] <= token_index[:, :, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, None, :]
    return (causal & same & real)[:, None]


def attention_weights(q: Float[Array, "b l h d"], k: Float[Array, "b l kv d"], mask: Bool[Array, "b 1 l l"],
                      positions=None, alibi=None, compute_dtype=jnp.float32) -> Float[Array, "b h l l"]:
    """softmax(q k^T / sqrt(d) + alibi * (pos_k - pos_q), where `mask`) in f32: the attention probabilities.

    The body every attention reference shares (its output is `grouped_mix(weights, v)`); only the mask
    differs (causal over packed rows here, over the kept tokens' original indices in random-LTD).
    Heads are grouped: query head h reads key/value head h // (h_q / h_kv). `positions` is needed only
    with `alibi`. Rows that see no key (padding) get a uniform average, which the loss mask then ignores.
    """
    scores = with_alibi(grouped_scores(q, k, compute_dtype), alibi, positions)
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def with_alibi(scores: Float[Array, "b h q k"], alibi: Float[Array, " h"] | None,
               positions: Int[Array, "b l"] | None) -> Float[Array, "b h q k"]:
    """`scores + slope_h * (pos_k - pos_q)` for ALiBi slopes `alibi`; `scores` unchanged without them."""
    if alibi is None:
        return scores
    distance = (positions[:, None, :] - positions[:, :, None]).astype(jnp.float32)  # pos_k - pos_q
    return scores + alibi[None, :, None, None] * distance[:, None]


def grouped_scores(q: Float[Array, "b q h d"], k: Float[Array, "b k kv d"], compute_dtype) -> Float[Array, "b h q k"]:
    """`q k^T / sqrt(d)` in f32 with grouped heads: query head h reads key head h // (h_q / h_kv)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).astype(compute_dtype)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(compute_dtype), preferred_element_type=jnp.float32)
    return s.reshape(batch, heads, length, k.shape[1]) / jnp.sqrt(jnp.float32(head_dim))


def grouped_mix(weights: Float[Array, "b h q k"], v: Float[Array, "b k kv d"],
                compute_dtype) -> Float[Array, "b q h d"]:
    """The attention output `weights v` (weights in `compute_dtype`, f32 accumulation), heads grouped as in
    `grouped_scores`."""
    batch, heads, length, keys = weights.shape
    kv_heads = v.shape[2]
    w = weights.astype(compute_dtype).reshape(batch, kv_heads, heads // kv_heads, length, keys)
    out = jnp.einsum("bkgqs,bskd->bqkgd", w, v.astype(compute_dtype), preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, v.shape[-1])

def causal_attention_reference(
    q: Float[Array, "b l h d"],
    k: Float[Array, "b l kv d"],
    v: Float[Array, "b l kv d"],
    segment_ids: Int[Array, "b l"],
    positions: Int[Array, "b l"] | None = None,
    alibi: Float[Array, " h"] | None = None,
    compute_dtype=jnp.float32,
) -> Float[Array, "b l h d"]:
    """softmax(q k^T / sqrt(d) + alibi * (pos_k - pos_q), masked) v, with the softmax in f32.

    Heads are grouped: query head h reads key/value head h // (h_q / h_kv). Rows that see no key
    (padding) get a uniform average, which the loss mask then ignores. `positions` default to
    0..l-1 in every row.
    """
    if alibi is not None and positions is None:
        positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    weights = attention_weights(q, k, attention_mask(segment_ids), positions, alibi, compute_dtype)
    return grouped_mix(weights, v, compute_dtype)


# Where "auto" takes the flash-attention kernel: GPU only, where it cut every preset's memory; compiled
# for TPU the change was mixed (-29% to +3% of the device total, docs/aot.md), its speed there unmeasured.
FLASH_PLATFORMS = ("gpu",)


def causal_attention(q, k, v, segment_ids, positions=None, alibi=None, compute_dtype=jnp.float32,
                     implementation: str = "auto", interpret: bool = False):
    """`causal_attention_reference` ("xla") or the Pallas flash-attention kernel ("pallas"); "auto": the
    kernel when compiled for a GPU, the reference for TPU and CPU (`jaxllm.ops.dispatch`).

    The kernel is `flash_attention` with every token kept in order, so it never holds the `[l, l]`
    scores; a row of padding (segment 0) sees no key and gets 0 there instead of the reference's
    uniform average, which the loss mask ignores. `interpret=True` runs it in the Pallas interpreter.
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), segment_ids.shape)

    def reference(*args):
        return causal_attention_reference(*args, compute_dtype).astype(jnp.float32)

    def pallas(q, k, v, segment_ids, positions, alibi):
        slots = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), segment_ids.shape)
        return flash_attention(q, k, v, segment_ids, positions, slots, alibi, compute_dtype, interpret)

    return dispatch("attention", implementation, pallas, reference, q, k, v, segment_ids, positions, alibi,
                    auto_platforms=FLASH_PLATFORMS)


def flash_attention(q, k, v, segment_ids, positions, token_index, alibi, compute_dtype, interpret=False):
    """The Pallas flash-attention kernel (`pallas_kernels/token_dropped_attention.py`: query i sees key j
    when `token_index[j] <= token_index[i]` in the same non-padding segment) in the compute dtype; under
    a mesh, inside `shard_map` on each device's rows and heads."""
    from pallas_kernels.token_dropped_attention import token_dropped_attention as kernel

    dtype = jnp.dtype(compute_dtype)

    def run(q, k, v, segment_ids, positions, token_index, alibi):
        out = kernel(q.astype(dtype), k.astype(dtype), v.astype(dtype), segment_ids, positions, token_index, alibi,
                     interpret=interpret)
        return out.astype(jnp.float32)

    args = (q, k, v, segment_ids, positions, token_index, alibi)
    mesh = kernel_mesh()
    if mesh is None:
        return run(*args)
    q_spec = logical_spec(mesh, ("batch", "attn_length", "attn_heads", "head_dim"), q.shape)
    kv_spec = logical_spec(mesh, ("batch", "attn_length", "attn_kv_heads", "head_dim"), k.shape)
    heads = lambda spec: tuple(spec)[2] if len(spec) > 2 else None  # noqa: E731
    if heads(q_spec) != heads(kv_spec):  # query head h reads key head h // groups: split both alike or neither
        q_spec = logical_spec(mesh, ("batch", "attn_length"), q.shape)
        kv_spec = logical_spec(mesh, ("batch", "attn_length"), k.shape)
    rows = logical_spec(mesh, ("batch", "attn_length"), segment_ids.shape)
    specs = (q_spec, kv_spec, kv_spec, rows, rows, rows, None if alibi is None else PartitionSpec(heads(q_spec)))
    return shard_kernel(run, mesh, specs, q_spec)(*args)
