"""Language-model losses the tasks share (pretraining, SFT, PPO's PTX term, VisualChat, distillation).

A task's loss function has the signature the training engine takes (`jaxllm.engine.step.LossFn`):
`loss_fn(params, batch, ltd) -> (loss_sum, count, aux_sums)`, sums over the batch's counted tokens
(or pairs, or answers) so that micro-batches and data slices add up exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.ltd import LTDPlan
from jaxllm.models.definition import ModelDef
from jaxllm.ops.cross_entropy import token_cross_entropy


def lm_loss_sums(model_def: ModelDef, params: Any, batch: dict[str, jax.Array], ltd: LTDPlan | None = None
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Summed next-token cross-entropy over `loss_mask`, the number of counted tokens, no aux metrics.

    `ltd`: random-LTD layers and kept positions for this batch (training only)."""
    model = model_def.bind(params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = model(*args) if ltd is None else model(*args, ltd=ltd)
    mask = batch["loss_mask"].astype(jnp.float32)
    if "weight" in batch:  # rows that only fill up a held-out batch (`padded_eval_batches`) weigh 0
        mask = mask * batch["weight"][:, None]
    return jnp.sum(token_cross_entropy(logits, batch["targets"]) * mask), jnp.sum(mask), {}
