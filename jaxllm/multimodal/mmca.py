"""Multi-modal causal attention (MMCA), DeepSpeed-VisualChat's attention over interleaved text and images.

Token types: 0 padding, 1 text, 2 image. With scores `S = q k^T / sqrt(d)` (plus ALiBi's
`slope * (pos_k - pos_q)` for BLOOM-style decoders), the attention weights of query `i` are

    A_i = softmax_{j in I(i)}(S_ij) + softmax_{j in T(i)}(S_ij)

where, for a text query, `I(i)` holds the image keys `j <= i` and `T(i)` the text keys `j <= i`; an
image query has `I(i) = {i}` and `T(i) = {}` (it attends to itself only, so its output is `v_i`); a
padding query has both sets empty. A softmax over an empty set contributes zero, so a text token
before the first image reads text only and a padding row is all zeros. Each branch sums to one:
text queries weight the two modalities independently, and MMCA adds no parameters.
(Yao et al., 2023, "DeepSpeed-VisualChat: Multi-Round Multi-Image Interleave Chat via Multi-Modal
Causal Attention", section 4.)

These are jaxllm's semantics, which follow the paper. DeepSpeed's code differs in two corners: its
image queries also see earlier text through the text mask, and a branch with no valid key becomes a
near-uniform average over the causal window (its masks add a finite minimum instead of excluding).

Three entry points:

- `mmca_attention(q, k, v, token_types)`: whole sequences, `[batch, seq, heads, head_dim]`.
- `mmca_override(token_types)`: the same as an attention override for `jaxllm.models.decoder.Decoder`
  (`Decoder(..., attention=...)`), grouped-query heads and ALiBi included.
- `mmca_cached_override(slot_types)`: the override for `Decoder.decode` over a `KVCache`, given the
  type of every cache slot (generated tokens are text).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxllm.ops.attention import grouped_mix, grouped_scores, with_alibi

PAD, TEXT, IMAGE = 0, 1, 2


def mmca_weights(
    scores: Float[Array, "b h q k"],
    q_types: Int[Array, "b q"],
    k_types: Int[Array, "b k"],
    visible: Bool[Array, "b q k"],
    diagonal: Bool[Array, "b q k"],
) -> Float[Array, "b h q k"]:
    """The summed two-branch weights `A` of the module docstring, in f32.

    `visible` marks the keys each query may see at all (causal, and not cache slots left of a row's
    start); `diagonal` marks key == query (an image query's only key).
    """
    text_q = (q_types == TEXT)[:, :, None]
    image_q = (q_types == IMAGE)[:, :, None]
    image_branch = visible & ((text_q & (k_types == IMAGE)[:, None, :]) | (image_q & diagonal))
    text_branch = visible & text_q & (k_types == TEXT)[:, None, :]
    scores = scores.astype(jnp.float32)

    def masked_softmax(mask):
        mask = mask[:, None]  # broadcast over heads
        top = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True))
        top = jnp.where(jnp.isfinite(top), top, 0.0)  # a row without keys: any finite shift
        e = jnp.where(mask, jnp.exp(jnp.where(mask, scores - top, 0.0)), 0.0)
        total = jnp.sum(e, axis=-1, keepdims=True)
        return e / jnp.where(total > 0, total, 1.0)  # no keys: all zeros

    return masked_softmax(image_branch) + masked_softmax(text_branch)


def mmca_attention(
    q: Float[Array, "b l h d"],
    k: Float[Array, "b l kv d"],
    v: Float[Array, "b l kv d"],
    token_types: Int[Array, "b l"],
    *,
    positions: Int[Array, "b l"] | None = None,
    alibi: Float[Array, " h"] | None = None,
    compute_dtype=jnp.float32,
) -> Float[Array, "b l h d"]:
    """MMCA over whole sequences (see the module docstring for the definition).

    Args:
      q: queries `[batch, seq, heads, head_dim]`.
      k, v: keys and values `[batch, seq, kv_heads, head_dim]`; `heads` must be a multiple of
        `kv_heads` (grouped-query attention: query head h reads key head h // (heads / kv_heads)).
      token_types: `[batch, seq]`, 0 padding, 1 text, 2 image.
      positions: `[batch, seq]` token positions for ALiBi (default 0, 1, 2, ...).
      alibi: optional `[heads]` ALiBi slopes; adds `slope * (pos_k - pos_q)` to the scores.
      compute_dtype: dtype of the two matmuls (f32 accumulation; the softmaxes are always f32).

    Returns:
      `[batch, seq, heads, head_dim]` f32; zeros at padding queries.

    Example::

        types = jnp.array([[1, 2, 2, 1, 1, 0]])          # text, an image of 2 tokens, text, pad
        out = mmca_attention(q, k, v, types)              # q, k, v: [1, 6, heads, head_dim]
    """
    batch, length = token_types.shape
    if q.shape[:2] != (batch, length) or k.shape[:2] != (batch, length) or v.shape != k.shape:
        raise ValueError(f"mmca_attention: q {q.shape}, k {k.shape}, v {v.shape} do not match token_types "
                         f"{token_types.shape} ([batch, seq, heads, head_dim] with equal key/value shapes)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"mmca_attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} key heads")
    if alibi is not None and positions is None:
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    scores = with_alibi(grouped_scores(q, k, compute_dtype), alibi, positions)
    idx = jnp.arange(length)
    causal = jnp.broadcast_to(idx[None, :] <= idx[:, None], (batch, length, length))
    diagonal = jnp.broadcast_to(idx[None, :] == idx[:, None], (batch, length, length))
    weights = mmca_weights(scores, token_types, token_types, causal, diagonal)
    return grouped_mix(weights, v, compute_dtype)


def mmca_override(token_types: Int[Array, "b l"]) -> Callable:
    """MMCA as the `attention=` override of `Decoder.__call__` for rows with these token types.

    The override receives what `jaxllm.ops.attention.causal_attention` receives; segment ids are not
    needed (padding is type 0; rows are not packed).
    """

    def attention(q, k, v, segment_ids, positions, alibi, compute_dtype):
        del segment_ids
        return mmca_attention(q, k, v, token_types, positions=positions, alibi=alibi, compute_dtype=compute_dtype)

    return attention


def mmca_cached_override(slot_types: Int[Array, "b s"]) -> Callable:
    """MMCA as the `attention=` override of `Decoder.decode` over a cache of `s` slots.

    `slot_types[b, j]` is the type of cache slot j (0 for left padding and unused slots, 2 for image
    tokens, 1 for text, including every slot generation will fill). The override receives what
    `jaxllm.models.decoder.cached_attention` receives: queries for slots `index .. index + t - 1`,
    one layer's cache `[b, kv_heads, s, d]`, the write index and each row's first real slot.
    """

    def attention(q, k, v, index, start, alibi, compute_dtype):
        batch, length = q.shape[:2]
        slots = k.shape[2]
        q_slot = index + jnp.arange(length)
        k_slot = jnp.arange(slots)
        visible = (k_slot[None, None, :] <= q_slot[None, :, None]) & (k_slot[None, None, :] >= start[:, None, None])
        diagonal = jnp.broadcast_to(k_slot[None, :] == q_slot[:, None], (batch, length, slots))
        q_types = jax.lax.dynamic_slice_in_dim(slot_types, index, length, axis=1)
        keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # -> [b, s, kv, d]
        scores = grouped_scores(q, keys, compute_dtype)
        if alibi is not None:
            distance = (k_slot[None, :] - q_slot[:, None]).astype(jnp.float32)
            scores = scores + alibi[None, :, None, None] * distance[None, None]
        weights = mmca_weights(scores, q_types, slot_types, visible, diagonal)
        return grouped_mix(weights, values, compute_dtype)

    return attention
