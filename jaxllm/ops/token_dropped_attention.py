"""Attention over the kept tokens of a random-LTD layer, masked by the tokens' original positions.

A random-LTD layer sees `r` of a row's `S` tokens (`jaxllm.ltd`). Query i attends to key j when
``token_index[j] <= token_index[i]`` (causal over the original sequence indices), in the same
segment, and the key is not padding (segment 0); ALiBi adds ``slope_h * (positions[j] - positions[i])``
with the original positions. The result for every kept query equals full causal attention over the
whole row with the dropped keys masked out (the tests check exactly that).

`token_dropped_attention_reference` is the definition (plain `jnp`, CPU path);
`token_dropped_attention(..., implementation=)` picks it ("xla") or the Pallas kernel in
`pallas_kernels/token_dropped_attention.py` ("pallas"); "auto" takes the kernel when the program is
compiled for a GPU or TPU and the reference for CPU.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.ops.attention import attention_mask, attention_weights, flash_attention, grouped_mix
from jaxllm.ops.dispatch import dispatch


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

    Heads are grouped as in `causal_attention_reference`, which differs only in the mask. A query that
    sees no key (padding) gets a uniform average over the kept keys, which the loss mask ignores.
    """
    mask = attention_mask(segment_ids, token_index)
    return grouped_mix(attention_weights(q, k, mask, positions, alibi, compute_dtype), v, compute_dtype)


def token_dropped_attention(q, k, v, segment_ids, positions, token_index, alibi=None, compute_dtype=jnp.float32,
                            implementation: str = "auto", interpret: bool = False):
    """Dispatches to the reference ("xla") or the Pallas kernel ("pallas"); "auto": the kernel when
    compiled for a GPU or TPU, the reference for CPU (`jaxllm.ops.dispatch`).

    `interpret=True` runs the kernel with the Pallas interpreter on any platform (CPU tests); without
    it the kernel is interpreted only on CPU.
    """
    def reference(*args):
        return token_dropped_attention_reference(*args, compute_dtype).astype(jnp.float32)

    def pallas(*args):
        return flash_attention(*args, compute_dtype, interpret)

    return dispatch("token-dropped attention", implementation, pallas, reference, q, k, v, segment_ids, positions,
                    token_index, alibi)
