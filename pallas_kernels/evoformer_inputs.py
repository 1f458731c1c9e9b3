"""Input checks of Evoformer attention, shared by every implementation (`jaxllm.ops.evoformer` and the kernel).

They live in the kernel package so that the kernel, a leaf, needs nothing from `jaxllm.ops`; the op
imports them from here. Plain `jnp` (no Pallas import), so the XLA path pays nothing for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.errors import UserError


def check_inputs(q, k, v, biases) -> tuple[jax.Array, ...]:
    """Validates shapes and dtypes; returns the biases as a tuple with `None` entries dropped.

    Raises `UserError` naming the tensor, what was found and what is allowed.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or len(x.shape) != 5:
            raise UserError(f"evoformer_attention: {name} must have rank 5 [B, N, L, H, D], got shape "
                            f"{getattr(x, 'shape', type(x).__name__)}")
    if k.shape != v.shape:
        raise UserError(f"evoformer_attention: k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3:] != k.shape[3:]:
        raise UserError(f"evoformer_attention: q {q.shape} and k {k.shape} must agree in B, N, H and D "
                        "(shapes [B, N, L, H, D])")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise UserError(f"evoformer_attention: empty input, q {q.shape}, k {k.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise UserError(f"evoformer_attention: q must be floating point, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise UserError(f"evoformer_attention: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    if biases is None:
        biases = ()
    elif hasattr(biases, "shape"):
        biases = (biases,)
    b, n, lq, h, _ = q.shape
    target = (b, n, h, lq, k.shape[2])
    kept = []
    for i, bias in enumerate(biases):
        if bias is None:
            continue
        if not hasattr(bias, "shape") or len(bias.shape) != 5:
            raise UserError(f"evoformer_attention: biases[{i}] must have rank 5, broadcastable to [B, N, H, Lq, Lk] = "
                            f"{list(target)}, got shape {getattr(bias, 'shape', type(bias).__name__)}")
        if any(s not in (1, t) for s, t in zip(bias.shape, target, strict=True)):
            raise UserError(f"evoformer_attention: biases[{i}] of shape {tuple(bias.shape)} does not broadcast to "
                            f"[B, N, H, Lq, Lk] = {list(target)} (each dimension must be 1 or equal)")
        if bias.dtype != q.dtype:
            raise UserError(f"evoformer_attention: biases[{i}] has dtype {bias.dtype}, q has {q.dtype}; "
                            "they must match")
        kept.append(bias)
    return tuple(kept)
