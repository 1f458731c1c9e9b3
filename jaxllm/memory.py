"""Per-device memory estimate for `--dry-run`, from shardings and a coarse activation model.

Parameters, gradients and optimizer state are exact (shard shapes times bytes). Activations are an
estimate: the tensors a pre-norm block keeps for its backward pass, per micro-batch on one device,
after Korthikanti et al. (2022) "Reducing Activation Recomputation in Large Transformer Models",
with f32 residuals and `compute_dtype` matmul inputs; with remat only each block's input is kept,
plus one block's worth during its recomputation.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax

from jaxllm.config import Config


def sharded_bytes(abstract: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs that carry shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def activation_bytes(config: Config, data_parallel: int, sequence_parallel: int, tensor_parallel: int) -> int:
    m, d = config.model, config.data
    batch = config.train.batch_size // config.train.grad_accum // data_parallel
    length = d.seq_len // sequence_parallel
    width = 2 if m.compute_dtype == "bfloat16" else 4
    tokens = batch * length
    heads = max(m.heads // tensor_parallel, 1)
    ffn = m.ffn_dim // tensor_parallel
    per_block = tokens * (
        4 * m.d_model * 3  # f32 residual stream and two norm outputs
        + width * (2 * m.d_model + 3 * m.d_model // tensor_parallel)  # matmul inputs, q/k/v
        + width * ffn * (3 if m.family == "llama" else 2)  # MLP hidden (and gate)
    ) + batch * heads * length * d.seq_len * (4 + width)  # attention scores (f32) and probabilities
    logits = tokens * m.vocab_size // tensor_parallel * 4 * 2  # logits and their gradient, f32
    if m.remat == "none":
        return m.layers * per_block + logits
    return m.layers * tokens * m.d_model * 4 + per_block + logits


def estimate(config: Config, layout_abstract: Any, grads_bytes: int, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Per-device bytes by category for one training step."""
    state = layout_abstract
    params = sharded_bytes(state["params"])
    optimizer = sharded_bytes(state["opt_state"])
    data_parallel = mesh_shape["data"] * mesh_shape["fsdp"]
    acts = activation_bytes(config, data_parallel, mesh_shape["sequence"], mesh_shape["tensor"])
    return {"params": params, "gradients": grads_bytes, "optimizer": optimizer, "activations": acts,
            "total": params + grads_bytes + optimizer + acts}


def device_memory(device: Any) -> tuple[int, str]:
    """(bytes, what) one device can hold: an accelerator's own memory limit, or on CPU the machine's
    RAM shared by its host devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    devices = max(len(jax.local_devices()), 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // devices, f"this machine's RAM over its {devices} {device.platform} devices"
