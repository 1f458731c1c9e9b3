"""Attention over the kept tokens of a random-LTD layer, masked by the tokens' original positions.

A random-LTD layer sees `r` of a row's `S` tokens (`jaxllm.ltd`). Query i attends to key j when
``token_index[j] <= token_index[i]`` (causal over the original sequence indices), in the same
segment, and the key is not padding (segment 0); ALiBi adds ``slope_h * (positions[j] - positions[i])``
with the original positions. The result for every kept query equals full causal attention over the
whole row with the dropped keys masked out (the tests check exactly that).

`token_dropped_attention_reference` is the definition (plain `jnp`, CPU path);
`token_dropped_attention(..., implementation=)` picks it ("xla") or the Pallas kernel in
`pallas_kernels/token_dropped_attention.py` ("pallas"); "auto" takes the kernel on GPU and TPU and the
reference on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def token_dropped_attention_reference(
    q: Float[Array, "b r h d"],
    k: Float[Array, "b r kv d"],
    v: Float[Array, "b r kv d"],
    segment_ids: Int[Array, "b r"],
    positions: Int[Array, "b r"],
    token_index: Int[Array, "b r"],
    alibi: Float[Array, " h"] | None = None,
    compute_dtype=jnp.float32,
) -> Float[Array, "b r h d"]:
    """softmax(q k^T / sqrt(d) + alibi * (pos_k - pos_q), masked) v with the softmax in f32.

    Heads are grouped as in `causal_attention_reference`. A query that sees no key (padding) gets a
    uniform average over the kept keys, which the loss mask ignores.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qg = q.reshape(batch, length, kv_heads, groups, head_dim).astype(compute_dtype)
    scores = jnp.einsum(
        "bqkgd,bskd->bkgqs", qg, k.astype(compute_dtype), preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    scores = scores.reshape(batch, heads, length, length)
    if alibi is not None:
        distance = (positions[:, None, :] - positions[:, :, None]).astype(jnp.float32)  # pos_k - pos_q
        scores = scores + alibi[None, :, None, None] * distance[:, None]
    causal = token_index[:, None, :] <= token_index[:, :, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, None, :]
    scores = jnp.where((causal & same & real)[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    probs = probs.reshape(batch, kv_heads, groups, length, length)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(compute_dtype), preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, head_dim)


def pallas_selected(implementation: str, platform: str | None = None) -> bool:
    """Whether `implementation` resolves to the Pallas kernel on `platform` (default: JAX's backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise UserError(f"token-dropped attention: unknown implementation '{implementation}'; expected "
                        f"{', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return (platform or jax.default_backend()) in ("gpu", "tpu")
    return implementation == "pallas"


def token_dropped_attention(q, k, v, segment_ids, positions, token_index, alibi=None, compute_dtype=jnp.float32,
                            implementation: str = "auto", interpret: bool = False):
    """Dispatches to the reference ("xla") or the Pallas kernel ("pallas"); "auto": kernel on GPU/TPU.

    `interpret=True` runs the kernel with the Pallas interpreter (CPU tests).
    """
    if pallas_selected(implementation):
        from pallas_kernels.token_dropped_attention import token_dropped_attention as kernel

        dtype = jnp.dtype(compute_dtype)
        return kernel(q.astype(dtype), k.astype(dtype), v.astype(dtype), segment_ids, positions, token_index, alibi,
                      interpret=interpret or jax.default_backend() == "cpu").astype(jnp.float32)
    return token_dropped_attention_reference(q, k, v, segment_ids, positions, token_index, alibi, compute_dtype)
