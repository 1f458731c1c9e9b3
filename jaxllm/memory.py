"""Per-device memory estimate of one training step for `--dry-run`, as named terms.

The state (parameters, optimizer state, gradients) is exact: shard shapes times bytes. The rest models
what the TPU and GPU compilers keep at the step's peak, in the backward pass of one micro-batch, as
their buffer assignments show (`scripts/dry_run_check.py` compares the total with theirs):

    peak = params + optimizer + gradients + micro_gradients + scanned_weights + scanned_gradients
           + accumulated_blocks + compute_weights + embedding_table + head_gradient + saved_activations
           + max(loss_backward, block_backward)

The state terms the layout places in host memory (`optimizer` with `mesh.offload=optimizer`, and
`params` with `optimizer_and_params`: the `pinned_host` memory kind on their shardings) make up
`host_total`; the rest of the peak is `total`, the device's figure, which is what the device memory and
the compiler's device total are compared with.

Per device, with b rows of a micro-batch (`batch_size / grad_accum / (data * fsdp)`), l tokens of each
row (`seq_len / sequence`) out of s, t = b l, d = d_model, f' the MLP hidden width (twice the MLP width
when gated), h query and g key/value heads of size e, V the vocabulary, L layers, w the bytes of the
compute dtype, and h, g, f', V split over the `tensor` axis (h and g also over `sequence`):

- `gradients`: the f32 gradient (the sum over micro-batches) in its layout; `micro_gradients`: with
  `grad_accum` > 1, one micro-batch's gradient beside the sum.
- `scanned_weights`, `scanned_gradients`: with `model.scan_layers` or stages, when the state holds one
  entry per block (random-LTD, the 1-bit optimizers, tasks other than pretraining and SFT), the block
  weights stacked inside the step (laid out like the parameters) and the stacked gradients the
  backward scan builds; a state that keeps the blocks stacked (`jaxllm.models.stacking`) has neither.
- `accumulated_blocks`: on TPU, with the blocks stacked in the state, no stages and `grad_accum` > 1,
  a second f32 buffer of the blocks' gradient that the compiled accumulation loop keeps (Llama 1B, 8
  scanned layers on one v5e chip: accumulating 4 micro-batches adds 3.2 GiB, one micro-batch's
  gradient being 1.8 of them; on an H100 it adds 1.7).
- `compute_weights`: on TPU, with the blocks stacked in the state and no stages, the compute-dtype copy
  of the stacked block weights (`w / 4` of them) that the compiler makes once before the layer loop
  (`bf16[layers, ...] convert` in its program; the GPU compiler converts a block at a time). With the
  parameters in host memory (`mesh.offload=optimizer_and_params`), on every platform, the devices' copy
  that the passes read: the block weights at `w / 4`, the others whole; the blocks' part of a
  micro-batch's gradient is then `w / 4` of its f32 size too.
- `embedding_table`: the token lookup gathers the whole f32 table, `4 V d` (every shard), when the table
  is sharded; `head_gradient`: the tied or untied output head's f32 weight gradient, `4 V d`, whole over
  fsdp until it is reduce-scattered (ZeRO-2/3).
- `saved_activations`: `L` times what one block keeps for the backward pass (`block_saved_bytes`).
- `loss_backward`: the f32 logits, `4 t V` (`logits_bytes`).
- `block_backward`: one block's backward pass, recomputed first under remat (`block_backward_bytes`).
- With pipeline stages (`mesh.stage` S > 1; R layer groups of K block slots per stage, M pipeline
  micro-batches, T = R M + S - 1 ticks, `jaxllm.models.pipeline`): the tick loop keeps what a block
  saves for every tick and slot of its stage, idle ticks included, so `saved_activations` is
  `T K` times one block's share of a pipeline micro-batch (b / M rows), and `block_backward` works on
  one pipeline micro-batch.

The platform is that of the devices the layout is on (a target's, for `python -m jaxllm.aot`); on CPU
the GPU compiler's rules apply. Not modelled: a TPU keeps buffers of a few MiB in on-chip memory, so for
toy models (totals of tens of MiB) the compiler's figure is far below this estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import Config
from jaxllm.mesh import HOST_MEMORY, STAGE_AXIS, PipelineSettings
from jaxllm.models import pipeline
from jaxllm.models.stacking import is_stacked
from jaxllm.ops.attention import FLASH_PLATFORMS
from jaxllm.ops.dispatch import pallas_selected

F32 = 4
TOTALS = ("total", "host_total")


def sharded_bytes(abstract: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs that carry shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """What one device computes for one micro-batch: rows, tokens per row and the local model widths."""

    rows: int  # b
    length: int  # l: tokens of a row on this device (after the sequence axis)
    seq_len: int  # whole rows: attention sees every key (Ulysses moves heads, not keys, between devices)
    d_model: int
    heads: int  # local query heads, h / k (attention heads also split over `sequence`)
    kv_heads: int
    head_dim: int
    ffn: int  # local MLP width, f / k
    vocab: int  # local vocabulary, V / k
    gated: bool  # SwiGLU (llama): a second MLP input projection
    width: int  # bytes of a compute-dtype element (matmul inputs)

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @classmethod
    def of(cls, config: Config, mesh_shape: dict[str, int]) -> MicroBatch:
        m = config.model
        tensor, sequence = mesh_shape.get("tensor", 1), mesh_shape.get("sequence", 1)
        data_parallel = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
        rows = max(config.train.batch_size // config.train.grad_accum // data_parallel, 1)
        split = lambda n, by: n // by if n % by == 0 else n  # noqa: E731 -- odd sizes replicate (jaxllm.mesh)
        attention_split = tensor * sequence
        return cls(rows=rows, length=config.data.seq_len // sequence, seq_len=config.data.seq_len,
                   d_model=m.d_model, heads=split(m.heads, attention_split),
                   kv_heads=split(m.num_kv_heads, attention_split), head_dim=m.head_dim, ffn=split(m.ffn_dim, tensor),
                   vocab=split(m.vocab_size, tensor), gated=m.family == "llama",
                   width=2 if m.compute_dtype == "bfloat16" else 4)


def block_saved_bytes(mb: MicroBatch, remat: str, platform: str = "gpu", flash: bool = False) -> int:
    """Bytes one block keeps for the backward pass of one micro-batch.

    - `full`: its f32 input, `4 t d`.
    - `dots` (`dots_with_no_batch_dims_saveable`): the f32 input, the f32 outputs of the projections
      (q, k, v, attention out, MLP in and gate) and the f32 residual between attention and MLP,
      `4 t (2 d + (h + 2 g) e + h e + f')`; attention scores come from batched matmuls and are recomputed.
    - `none`: per token the two f32 residuals and the MLP hidden, `4 (2 d + f')`, the compute-dtype
      inputs of every matmul, `w (2 d + (h + 2 g) e + h e + f')`, and per score the attention
      probabilities: the GPU compiler keeps the f32 scores and the compute-dtype probabilities,
      `b h s s (4 + w)` (its buffer assignment for GPT-2 124M); the TPU compiler's total is consistent
      with the probabilities only, `b h s s w` (GPT-2 124M on v5e: 5.71 GiB per chip, 5.06 estimated).
      With the flash-attention kernel (`flash`) no score is kept: its output in the compute dtype and
      its f32 log-sum-exp per query, `b s h (w e + 4)`.
    """
    t, d, w = mb.tokens, mb.d_model, mb.width
    projections = (mb.heads + 2 * mb.kv_heads) * mb.head_dim + mb.heads * mb.head_dim
    hidden = mb.ffn * (2 if mb.gated else 1)
    if remat == "full":
        return F32 * t * d
    if remat == "dots":
        return F32 * t * (2 * d + projections + hidden)
    per_token = F32 * (2 * d + hidden) + w * (2 * d + projections + hidden)
    if flash:
        return t * per_token + mb.rows * mb.seq_len * mb.heads * (w * mb.head_dim + F32)
    return t * per_token + attention_bytes(mb, w if platform == "tpu" else F32 + w)


def attention_bytes(mb: MicroBatch, per_score: int) -> int:
    """`b h s s * per_score`: arrays over every (query, key) pair of whole rows for the local heads
    (with a `sequence` axis, attention holds whole rows and splits the heads: Ulysses)."""
    return mb.rows * mb.heads * mb.seq_len * mb.seq_len * per_score


def logits_bytes(mb: MicroBatch) -> int:
    """The f32 logits, `4 t V` (their gradient takes their place): the peak of the loss's backward pass."""
    return F32 * mb.tokens * mb.vocab


def block_backward_bytes(mb: MicroBatch, remat: str, flash: bool = False) -> int:
    """Working set of one block's backward pass.

    Under remat the block runs forward again first: the attention scores, probabilities (f32 and
    compute dtype) and their gradient, `b h s s (12 + w)`, the compute-dtype matmul inputs,
    `w t (2 d + f')`, and with `full` also the f32 activations per token, `4 t (4 d + 2 f')`. Without
    remat only the gradients are new: of the probabilities and scores, `8 b h s s`, and the f32
    gradients of the residual and the MLP hidden, `4 t (d + f')`. The flash-attention kernel (`flash`)
    holds no score: in place of those terms, its f32 gradients of q and of k and v per query head,
    `12 b s h e`.
    """
    t, d, w = mb.tokens, mb.d_model, mb.width
    hidden = mb.ffn * (2 if mb.gated else 1)
    kernel = 3 * F32 * mb.rows * mb.seq_len * mb.heads * mb.head_dim
    if remat == "none":
        return (kernel if flash else attention_bytes(mb, 2 * F32)) + F32 * t * (d + hidden)
    recomputed = w * (2 * d + hidden) + (F32 * (4 * d + 2 * hidden) if remat == "full" else 0)
    return (kernel if flash else attention_bytes(mb, 3 * F32 + w)) + t * recomputed


def platform_of(abstract: Any) -> str:
    """The platform of the devices a tree of ShapeDtypeStructs is laid out on ("tpu", "gpu", "cpu")."""
    for leaf in jax.tree.leaves(abstract):
        mesh = getattr(leaf.sharding, "mesh", None)
        devices = getattr(mesh, "devices", None)
        if devices is not None and devices.size:
            return devices.flat[0].platform
    return "cpu"


def _blocks(tree: Any) -> Any:
    return tree.get("blocks", {}) if isinstance(tree, dict) else {}


def host_terms(layout: Any) -> dict[str, int]:
    """Bytes per device of each state term that the layout places in host memory (`mesh.offload`)."""
    parts = {"params": layout.abstract["params"], "optimizer": layout.abstract["opt_state"]}
    placed = {name: [leaf for leaf in jax.tree.leaves(tree) if leaf.sharding.memory_kind == HOST_MEMORY]
              for name, tree in parts.items()}
    return {name: sharded_bytes(leaves) for name, leaves in placed.items() if leaves}


def estimate(config: Config, layout: Any, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of one training step by term (module docstring), their device `total` and their
    `host_total` (0 without offload).

    `layout`: the task's `StateLayout`: the state's ShapeDtypeStructs with their shardings (their devices
    say which compiler's rules apply) and the f32 gradients' shardings (`grads`)."""
    layout_abstract = layout.abstract
    grads_bytes = sharded_bytes(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                             layout_abstract["params"], layout.grads))
    m, accum = config.model, config.train.grad_accum
    mb = MicroBatch.of(config, mesh_shape)
    platform = platform_of(layout_abstract["params"])
    params = sharded_bytes(layout_abstract["params"])
    block_params = sharded_bytes(_blocks(layout_abstract["params"]))
    block_grads = round(grads_bytes * block_params / params) if params else 0  # same layout ratio
    stages = mesh_shape.get(STAGE_AXIS, 1)
    scanned = m.scan_layers or stages > 1
    # Blocks the state holds one entry each of are stacked inside the step: a copy of their weights and
    # of their gradients. A state that keeps them stacked (`jaxllm.models.stacking`) has neither.
    copied = scanned and not is_stacked(_blocks(layout_abstract["params"]))
    saved_blocks, block_mb = m.layers, mb  # block inputs kept for the backward pass, and on how many rows
    if stages > 1:
        settings = PipelineSettings.of(config.mesh, stages)
        per_group, _ = pipeline.slots(m.layers, stages * settings.repeats)
        saved_blocks = pipeline.ticks(settings) * per_group
        block_mb = dataclasses.replace(mb, rows=max(mb.rows // settings.microbatches, 1))
    sharded_weights = config.mesh.zero_stage >= 3 and mesh_shape.get("fsdp", 1) > 1
    sharded_grads = config.mesh.zero_stage >= 2 and mesh_shape.get("fsdp", 1) > 1
    table = m.vocab_size * m.d_model * F32
    compute_bytes = jnp.dtype(m.compute_dtype).itemsize
    # The flash-attention kernel where `jaxllm.ops.attention.causal_attention` picks it (not inside
    # pipeline stages).
    flash = stages == 1 and pallas_selected("attention", m.attention_implementation, platform, FLASH_PLATFORMS)
    # With the parameters in host memory the passes read a copy with the block weights in the compute
    # dtype (`jaxllm.engine.offload.compute_copy`), so the blocks' part of a micro-batch's gradient
    # comes in that dtype too.
    params_on_host = "params" in host_terms(layout)
    narrowed = lambda whole, blocks: whole - blocks + round(blocks * compute_bytes / F32)  # noqa: E731
    micro = narrowed(grads_bytes, block_grads) if params_on_host else grads_bytes
    terms = {
        "params": params,
        "optimizer": sharded_bytes(layout_abstract["opt_state"]),
        # The f32 sum over micro-batches, or the one micro-batch's gradient.
        "gradients": micro if accum == 1 else grads_bytes,
        # A micro-batch's gradient beside the sum; with a stacked copy its blocks' part is that copy.
        "micro_gradients": (micro - (block_grads if copied else 0)) if accum > 1 else 0,
        "scanned_weights": block_params if copied else 0,  # the blocks' weights stacked inside the step
        "scanned_gradients": block_grads if copied else 0,  # and their gradients, stacked by the backward scan
        # The TPU compiler keeps a second f32 buffer of the stacked blocks' gradient in the accumulation loop.
        "accumulated_blocks": block_grads
        if platform == "tpu" and accum > 1 and scanned and stages == 1 and not copied else 0,
        # The devices' copy of parameters kept in host memory; else the TPU compiler's conversion of
        # stacked block weights to the compute dtype, once, before the layer loop.
        "compute_weights": narrowed(params, block_params) if params_on_host
        else round(block_params * compute_bytes / F32)
        if platform == "tpu" and scanned and stages == 1 and not copied and compute_bytes < F32 else 0,
        # The token lookup gathers the whole f32 table (over fsdp and tensor) when it is sharded.
        "embedding_table": table if sharded_weights or mesh_shape.get("tensor", 1) > 1 else 0,
        # The output head's weight gradient, whole over fsdp until it is reduce-scattered.
        "head_gradient": F32 * mb.vocab * m.d_model if sharded_grads else 0,
        "saved_activations": saved_blocks * block_saved_bytes(block_mb, m.remat, platform, flash),
        "loss_backward": logits_bytes(mb),
        "block_backward": block_backward_bytes(block_mb, m.remat, flash),
    }
    peak = sum(terms.values()) - min(terms["loss_backward"], terms["block_backward"])
    host = sum(host_terms(layout).values())
    terms["total"] = peak - host
    terms["host_total"] = host
    return terms


def describe(terms: dict[str, int], layout: Any) -> list[str]:
    """`--dry-run`'s memory lines: the terms (those this config does not have left out), each host term
    marked, then the device and host totals."""
    on_host = host_terms(layout)
    shown = [f"{name} {value / 2**30:.3f} GiB" + (" (host)" if name in on_host else "")
             for name, value in terms.items() if value and name not in TOTALS]
    lines = ["per-device memory estimate: " + ", ".join(shown)]
    lines.append(f"  device total {terms['total'] / 2**30:.3f} GiB (the larger of loss_backward and block_backward "
                 "counts)")
    if on_host:
        lines.append(f"  host total {terms['host_total'] / 2**30:.3f} GiB ({', '.join(on_host)} in host memory, "
                     "mesh.offload; not in the device total)")
    return lines


def device_memory(device: Any) -> tuple[int, str]:
    """(bytes, what) one device can hold: an accelerator's own memory limit, or on CPU the machine's
    RAM shared by its host devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    devices = max(len(jax.local_devices()), 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // devices, f"this machine's RAM over its {devices} {device.platform} devices"


def compiled_total(analysis: Any) -> int:
    """Peak bytes per device of a compiled program, from its `memory_analysis()`: arguments, outputs
    not written over donated arguments, and temporaries."""
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
            + analysis.temp_size_in_bytes)


def verdict(estimated: int, capacity: int, what: str, compiled: int | None = None) -> str:
    """The line `--dry-run` ends its memory report with: the estimate against the device, and the
    compiler's figure beside it when the step was compiled for the local accelerators."""
    gib = 2**30
    if compiled is None:
        fits = "fits" if estimated <= capacity else "does NOT fit"
        return (f"verdict: {estimated / gib:.3f} GiB per device against {capacity / gib:.2f} GiB ({what}): "
                f"{fits} by this estimate; python -m jaxllm.aot --target=... gives the compiler's figure "
                "for a TPU or GPU")
    fits = "fits" if compiled <= capacity else "does NOT fit"
    return (f"verdict: compiled for these devices, {compiled / gib:.3f} GiB per device against "
            f"{capacity / gib:.2f} GiB ({what}): {fits}; the estimate {estimated / gib:.3f} GiB is "
            f"{estimated / compiled - 1:+.0%} off")
