"""ZeroQuant: post-training quantization (PTQ) and layer-by-layer knowledge distillation (LKD).

Yao et al., 2022, "ZeroQuant: Efficient and Affordable Post-Training Quantization for Large-Scale
Transformers" (arXiv:2206.01861); DeepSpeed's recipe in DeepSpeedExamples `compression/bert/run_glue_lkd.py`.

PTQ (`ptq`): the weights named by the plan are quantized group-wise (W8, or W4 for the MLP and W8 for
attention) and stored as integers; input activations are quantized token-wise at run time (A8,
`dynamic`), or with one range per module calibrated on a few batches (`static`, `calibrate`).

LKD (`lkd`): the quantized model is improved one block at a time, without the original training
recipe: for block l, the teacher's hidden states on any text give the input `H_l` and the target
`H_{l+1}`; the student's block l (fake-quantized weights and activations, straight-through
gradients) minimises

    L_l = mean((block_l^student(H_l) - H_{l+1})^2)

with AdamW on that block's parameters only, through the training engine's step (`block_loss_fn`).
Every block starts from the teacher's weights and sees the teacher's input, so the blocks are
independent and the loss of each is reported before and after.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm import mesh as mesh_lib
from jaxllm.compression.linear import record_ranges
from jaxllm.compression.model import (
    check_same_shapes,
    compress_params,
    forward_states,
    run_block,
    static_ranges,
    store_params,
)
from jaxllm.compression.qtensor import QuantSpec
from jaxllm.compression.quantizers import ActRange
from jaxllm.engine.optimizer import TrainOptimizer
from jaxllm.engine.state import ParamTree, all_params, initial_state
from jaxllm.engine.step import LossFn, evaluate, make_eval_step, make_train_step
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef

Batch = dict[str, jax.Array]


def _inputs(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens = jnp.asarray(batch["inputs"], jnp.int32)
    positions = batch.get("positions")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape) if positions is None \
        else jnp.asarray(positions, jnp.int32)
    segments = batch.get("segment_ids")
    segments = jnp.ones(tokens.shape, jnp.int32) if segments is None else jnp.asarray(segments, jnp.int32)
    return tokens, positions, segments


def calibrate(model_def: ModelDef, params: dict, specs: dict[str, QuantSpec], batches: Iterable[Batch],
              momentum: float = 0.95) -> dict[str, ActRange]:
    """Static activation ranges from a forward pass per batch: `r <- momentum r + (1 - momentum) (min, max)`
    (the first batch sets it), as DeepSpeed's static quantizer updates in training mode.

    `params` are f32 master weights; the forward uses the planned fake-quantized weights, so each
    module's range is measured on the input it sees in the quantized model. Returns {} when no
    module is static.
    """
    ranges = static_ranges(specs)
    if not ranges:
        return {}

    @jax.jit
    def step(params, ranges, tokens, positions, segments):
        model = model_def.bind(compress_params(params, specs, ranges=ranges))
        with record_ranges(momentum) as updated:
            model(tokens, positions, segments)
        return {**ranges, **updated}

    seen = 0
    for batch in batches:
        ranges = step(params, ranges, *_inputs(batch))
        seen += 1
    if not seen:
        raise UserError("static activation calibration needs at least one batch")
    return ranges


def ptq(model_def: ModelDef, params: dict, specs: dict[str, QuantSpec],
        calibration: Iterable[Batch] = ()) -> tuple[dict, dict[str, ActRange]]:
    """Post-training quantization: (params with integer `QuantizedWeight`s, static ranges)."""
    ranges = calibrate(model_def, params, specs, calibration)
    return store_params(params, specs, ranges), ranges


class LKDReport(NamedTuple):
    """Per block: mean distillation loss over the LKD batches before and after its training."""

    before: list[float]
    after: list[float]


def teacher_hidden(model_def: ModelDef, params: dict, batches: Sequence[Batch]) -> list[list[jax.Array]]:
    """The teacher's hidden states (embedding output, then each block's output) for each batch."""

    @jax.jit
    def states(params, tokens, positions, segments):
        return forward_states(model_def.bind(params), tokens, positions, segments, attention=False).hidden

    return [states(params, *_inputs(b)) for b in batches]


BLOCK, MODEL = "block", "model"  # parameter groups of a block's distillation state


def block_loss_fn(model_def: ModelDef, specs: dict[str, QuantSpec], ranges: dict[str, ActRange] | None,
                  layer: int) -> LossFn:
    """LKD's `jaxllm.engine.step.LossFn` for block `layer`: `L_l` of the module doc on a batch of the
    teacher's `x` (input) and `target` (output) hidden states, with the trained `block` in place of
    that block of the frozen `model` (count 1: the loss is a batch mean)."""

    def loss_fn(params, batch, ltd=None):
        tree = dict(params[MODEL], blocks={**params[MODEL]["blocks"], layer: params[BLOCK]})
        model = model_def.bind(compress_params(tree, specs, ranges=ranges))
        out = run_block(model, layer, batch["x"], batch["positions"], batch["segment_ids"])
        return jnp.mean(jnp.square(out - batch["target"])), jnp.float32(1), {}

    return loss_fn


def lkd(
    model_def: ModelDef,
    teacher: dict,
    student: dict,
    specs: dict[str, QuantSpec],
    batches: Sequence[Batch],
    *,
    steps: int = 100,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    ranges: dict[str, ActRange] | None = None,
    layers: Sequence[int] | None = None,
    log=None,
) -> tuple[dict, LKDReport]:
    """Layer-wise distillation of a fake-quantized `student` (f32 master params) towards `teacher`.

    Args:
      model_def: the (common) model definition.
      teacher, student: f32 params dicts of the same shapes (the student usually starts as a copy).
      specs: the quantization plan (`jaxllm.compression.rules.plan`).
      batches: token batches (`inputs`, optionally `positions`, `segment_ids`); any text works, LKD
        needs no labels. Steps cycle through them.
      steps: AdamW steps per block; learning_rate, weight_decay: AdamW settings.
      ranges: static activation ranges (kept fixed during LKD).
      layers: blocks to distill (default all).

    Returns:
      The student's updated master params and the per-block losses before and after.
    """
    check_same_shapes(teacher, student, "LKD")
    if not batches:
        raise UserError("LKD needs at least one batch of tokens")
    if steps < 1:
        raise UserError(f"LKD steps: got {steps}; expected a positive integer")
    num_layers = len(student["blocks"])
    layers = list(range(num_layers)) if layers is None else list(layers)
    hidden = teacher_hidden(model_def, teacher, batches)
    inputs = [_inputs(b) for b in batches]
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt = TrainOptimizer(tx, optax.constant_schedule(learning_rate))
    mesh = mesh_lib.one_replica_mesh()

    def block_batch(i: int, layer: int) -> Batch:
        _, positions, segments = inputs[i]
        return {"x": hidden[i][layer], "target": hidden[i][layer + 1], "positions": positions, "segment_ids": segments}

    before, after = [], []
    student = dict(student, blocks=dict(student["blocks"]))
    for layer in layers:
        loss_fn = block_loss_fn(model_def, specs, ranges, layer)
        tree = ParamTree({BLOCK: model_def.logical_axes["blocks"][layer], MODEL: model_def.logical_axes},
                         {BLOCK: model_def.shapes["blocks"][layer], MODEL: model_def.shapes})
        eval_step = make_eval_step(loss_fn)
        block_batches = [block_batch(i, layer) for i in range(len(batches))]
        with jax.set_mesh(mesh):
            layout = opt.layout(mesh, tree, 0, frozen=(MODEL,))
            state = initial_state(layout, tx, {BLOCK: student["blocks"][layer], MODEL: student}, donate=False)
            before.append(evaluate(eval_step, all_params(state), block_batches)["loss"])
            train_step = make_train_step(loss_fn, opt, layout)
            for step in range(steps):
                state, _ = train_step(state, block_batches[step % len(batches)])
            after.append(evaluate(eval_step, all_params(state), block_batches)["loss"])
        student["blocks"][layer] = state["params"][BLOCK]
        if log is not None:
            log(f"LKD block {layer}: distillation loss {before[-1]:.4g} -> {after[-1]:.4g} ({steps} steps)")
    return student, LKDReport(before, after)

