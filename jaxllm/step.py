"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)` under `jax.jit`.

A batch is a dict of `[global_batch, seq_len]` arrays: `inputs`, `targets`, `segment_ids`,
`positions` (int32) and `loss_mask` (f32; 0 on padding and on targets that cross a document boundary).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm import ltd as ltd_lib
from jaxllm.state import ModelDef, StateLayout

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def loss_sums(model_def: ModelDef, params: Any, batch: dict[str, jax.Array],
              ltd: ltd_lib.LTDPlan | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (f32) over `loss_mask`, and the number of counted tokens.

    `ltd`: random-LTD layers and kept positions for this batch (training only)."""
    model = model_def.bind(params)
    if ltd is None:
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    else:
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], ltd=ltd)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _split_micro(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, ...] -> [accum, B / accum, ...], taking rows i * accum + a into micro-batch a so that each
    device's contiguous block of rows stays on that device (no resharding)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)


def make_train_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    layout: StateLayout,
    grad_accum: int = 1,
    ltd: ltd_lib.LTDSetup | None = None,
) -> Callable:
    """Builds the jitted step. Gradients are the mean over all counted tokens of the global batch,
    accumulated over `grad_accum` micro-batches. A step whose loss or gradient norm is not finite
    leaves parameters and optimizer state unchanged and increments `skipped_steps`.

    With `ltd` (random-LTD) the step is `step(state, batch, kept)`: `kept` (static; one compilation
    per value) is the kept length, or None to keep every token. Kept positions are drawn inside the
    step from `ltd.seed` and `state["step"]` (`jaxllm.ltd.ltd_key`), so resuming redraws them exactly."""

    def micro_loss(p, b):
        if "ltd_indices" not in b:
            return loss_sums(model_def, p, b)
        plan = ltd_lib.LTDPlan(ltd.layers, jnp.swapaxes(b["ltd_indices"], 0, 1), ltd.implementation)
        return loss_sums(model_def, p, {k: v for k, v in b.items() if k != "ltd_indices"}, plan)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state, batch, kept=None):
        params = state["params"]
        if kept is not None:
            rows, length = batch["inputs"].shape
            indices = ltd_lib.sample_kept_indices(ltd_lib.ltd_key(ltd.seed, state["step"]), len(ltd.layers), rows,
                                                  length, kept)
            batch = {**batch, "ltd_indices": jnp.swapaxes(indices, 0, 1)}  # [B, k, r]: splits like the batch

        def accumulate(carry, micro):
            grad_sum, loss_sum, count = carry
            (loss, n), grads = grad_fn(params, micro)
            grads = jax.lax.with_sharding_constraint(grads, layout.grads)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (jax.lax.with_sharding_constraint(zeros, layout.grads), jnp.float32(0), jnp.float32(0))
        if grad_accum == 1:
            (grad_sum, loss_sum, count), _ = accumulate(init, batch)
        else:
            (grad_sum, loss_sum, count), _ = jax.lax.scan(accumulate, init, _split_micro(batch, grad_accum))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {
            "step": state["step"] + 1,
            "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "tokens": count,
                   "skipped": (~finite).astype(jnp.int32)}
        return new_state, metrics

    if ltd is not None:
        return jax.jit(step, in_shardings=(layout.state, None), out_shardings=(layout.state, None),
                       donate_argnums=0, static_argnums=2)
    return jax.jit(step, in_shardings=(layout.state, None), out_shardings=(layout.state, None),
                   donate_argnums=0)


def make_eval_step(model_def: ModelDef, layout: StateLayout) -> Callable:
    """Returns the summed loss and token count of one batch; callers average over batches."""

    def step(params, batch):
        return loss_sums(model_def, params, batch)

    return jax.jit(step, in_shardings=(layout.state["params"], None))
