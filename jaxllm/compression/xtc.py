"""XTC: extreme (binary or ternary) weight quantization trained with knowledge distillation, and layer reduction.

Wu et al., 2022, "Extreme Compression for Pre-trained Transformers Made Simple and Efficient"
(arXiv:2206.01859); the loss follows DeepSpeedExamples `compression/bert/util.py`.

The student starts from the teacher: all its layers, or with layer reduction only the teacher's
blocks `teacher_layers` (student block i <- teacher block `teacher_layers[i]`, plus embeddings, norms
and head). It trains with fake-quantized weights (1 or 2 bits, straight-through gradients) and
activations against the f32 teacher on

    L = w_logits * soft_CE(student logits, softmax(teacher logits))
      + w_attention * sum_i MSE(A_i^student, A_{att[i]}^teacher)
      + w_hidden * sum_j MSE(H_j^student, H_{rep[j]}^teacher)
      + w_lm * CE(student logits, labels)            (w_lm = 0 in DeepSpeed's recipe)

where A are attention probabilities and H hidden states (H_0 = embedding output). Layer maps
(`layer_maps`): with reduction `att = teacher_layers`, `rep = [teacher_layers[0] - 1] + [t + 1 for t
in teacher_layers]`; without, with `p = T / S` teacher blocks per student block, `att_i = i p + p - 1`
and `rep_i = i p`. DeepSpeed's `teacher_layers[0] - 1` is -1 when the first kept layer is 0, which
would silently compare the embeddings with the teacher's last hidden state; jaxllm maps it to 0 (the
embeddings). soft_CE is DeepSpeed's `(-softmax(t) * log_softmax(s)).mean()` (a mean over the
vocabulary too), restricted to counted tokens when the batch has a loss mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from jaxllm import mesh as mesh_lib
from jaxllm.compression.linear import record_ranges
from jaxllm.compression.model import States, compress_params, forward_states
from jaxllm.compression.qtensor import QuantSpec
from jaxllm.compression.quantizers import ActRange
from jaxllm.engine import loop, optimizer
from jaxllm.engine.checkpoint import Checkpointer, run_meta
from jaxllm.engine.state import ParamTree, initial_state
from jaxllm.engine.step import BUFFERS, LossFn, make_train_step
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef


class KDWeights(NamedTuple):
    logits: float = 1.0
    attention: float = 1.0
    hidden: float = 1.0
    lm: float = 0.0


class LayerMaps(NamedTuple):
    attention: tuple[int, ...]  # student block i <-> teacher block attention[i]
    hidden: tuple[int, ...]  # student hidden j <-> teacher hidden hidden[j]


def layer_maps(teacher_layers: int, student_layers: int, kept: Sequence[int] | None = None) -> LayerMaps:
    """Which teacher attention maps and hidden states each student one is distilled towards."""
    if kept is not None:
        kept = tuple(kept)
        if len(kept) != student_layers:
            raise UserError(f"layer_reduction.teacher_layer lists {len(kept)} layers but the student has "
                            f"{student_layers}")
        return LayerMaps(kept, (max(kept[0] - 1, 0),) + tuple(t + 1 for t in kept))
    if student_layers < 1 or teacher_layers % student_layers:
        raise UserError(f"a {student_layers}-layer student of a {teacher_layers}-layer teacher needs "
                        "layer_reduction.teacher_layer (the teacher's depth is not a multiple of the student's)")
    per = teacher_layers // student_layers
    return LayerMaps(tuple(i * per + per - 1 for i in range(student_layers)),
                     tuple(i * per for i in range(student_layers + 1)))


def soft_cross_entropy(student: Float[Array, "b l v"], teacher: Float[Array, "b l v"],
                       mask: Float[Array, "b l"] | None = None) -> Float[Array, ""]:
    """mean over tokens (and the vocabulary) of `-softmax(teacher) * log_softmax(student)`."""
    per = -jnp.sum(jax.nn.softmax(teacher.astype(jnp.float32), -1)
                   * jax.nn.log_softmax(student.astype(jnp.float32), -1), axis=-1) / student.shape[-1]
    if mask is None:
        return jnp.mean(per)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd_loss(student: States, teacher: States, maps: LayerMaps, weights: KDWeights,
            batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """XTC's distillation loss (module doc) and its parts."""
    mask = batch.get("loss_mask")
    teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
    logits = soft_cross_entropy(student.logits, teacher.logits, mask)
    attention = jnp.float32(0)  # the forward may skip attention maps when their weight is 0
    if student.attention:
        attention = sum(jnp.mean(jnp.square(s - teacher.attention[t]))
                        for s, t in zip(student.attention, maps.attention, strict=True))
    hidden = sum(jnp.mean(jnp.square(s - teacher.hidden[t])) for s, t in zip(student.hidden, maps.hidden, strict=True))
    parts = {"kd_logits": logits, "kd_attention": attention, "kd_hidden": hidden}
    total = weights.logits * logits + weights.attention * attention + weights.hidden * hidden
    if weights.lm:
        ce = optax.softmax_cross_entropy_with_integer_labels(student.logits.astype(jnp.float32), batch["targets"])
        m = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
        parts["lm"] = jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
        total = total + weights.lm * parts["lm"]
    return total, parts


def _batch_inputs(batch):
    tokens = batch["inputs"]
    return tokens, batch.get("positions"), batch.get("segment_ids")


TEACHER, STUDENT = "teacher", "student"  # parameter groups of the distillation state


def kd_loss_fn(teacher_def: ModelDef, student_def: ModelDef, specs: dict[str, QuantSpec], maps: LayerMaps,
               weights: KDWeights) -> LossFn:
    """XTC's `jaxllm.engine.step.LossFn` over the groups `student` (trained), `teacher` (frozen, f32,
    no gradient) and `buffers` (the static activation ranges, when any module has them): the batch's
    distillation loss with a count of 1 (the loss is a batch mean, so micro-batches are averaged), its
    parts as aux, and the ranges after the batch (DeepSpeed's training-mode EMA, `record_ranges`)."""
    use_attention = weights.attention != 0

    def loss_fn(params, batch, ltd=None):
        ranges = params.get(BUFFERS, {})
        inputs = _batch_inputs(batch)
        t_states = forward_states(teacher_def.bind(params[TEACHER]), *inputs, attention=use_attention)
        model = student_def.bind(compress_params(params[STUDENT], specs, ranges=ranges))
        with record_ranges() as updated:
            s_states = forward_states(model, *inputs, attention=use_attention)
        loss, parts = kd_loss(s_states, t_states, maps, weights, batch)
        aux = dict(parts) | ({BUFFERS: {**ranges, **updated}} if ranges else {})
        return loss, jnp.float32(1), aux

    return loss_fn


class XTCResult(NamedTuple):
    student: dict  # f32 master params
    ranges: dict[str, ActRange]
    history: list[dict[str, Any]]  # the logged rows


def train_student(config: Any, workdir: Path, teacher_def: ModelDef, teacher: dict, student_def: ModelDef,
                  student: dict, specs: dict[str, QuantSpec], batches: Any, maps: LayerMaps,
                  weights: KDWeights | None = None, ranges: dict[str, ActRange] | None = None) -> XTCResult:
    """Distils the fake-quantized `student` from `teacher` for `train.steps` steps of the training
    engine on one device: `optimizer.*` and `train.*` (batch size, `grad_accum`, learning-rate
    schedule, `log_every`) as in pretraining; checkpoints every `checkpoint.every` steps in
    `WORKDIR/checkpoints` and rows in `WORKDIR/metrics.jsonl`, so a rerun resumes. `batches`: a
    checkpointable iterator of `train.batch_size` rows (`jaxllm.data.pipeline.make_train_iterator`)."""
    mesh = mesh_lib.one_replica_mesh()
    model = ParamTree({TEACHER: teacher_def.logical_axes, STUDENT: student_def.logical_axes},
                      {TEACHER: teacher_def.shapes, STUDENT: student_def.shapes})
    ranges = dict(ranges or {}) or None
    with jax.set_mesh(mesh):
        opt = optimizer.build(config, mesh, model, frozen=(TEACHER,), reads_params="XTC's student export")
        layout = opt.layout(mesh, model, 0, frozen=(TEACHER,), buffers=ranges)
    student_cfg = student_def.bind(student).cfg
    meta = run_meta(student_cfg, opt.signature(), xtc={"layer_maps": maps._asdict()})
    ckpt = Checkpointer.for_run(workdir, config)
    train = config.train
    with jax.set_mesh(mesh):
        state, start = ckpt.resume_or_init(layout.abstract, batches, meta, lambda: initial_state(
            layout, opt.tx, {TEACHER: teacher, STUDENT: student}, ranges, donate=False))
        step = make_train_step(kd_loss_fn(teacher_def, student_def, specs, maps, weights or KDWeights()), opt, layout,
                               train.grad_accum)

    step_fn = loop.batch_steps(step, batches, mesh, train.batch_size)

    def row_fn(_, host, work, seconds, steps):
        return {k: float(v) for k, v in host.items() if k not in ("tokens", "skipped")} | {
            "steps_per_sec": steps / seconds}

    with jax.set_mesh(mesh):
        state, _ = loop.run(config, workdir, loop.Cadence.from_config(config, eval_at_end=False), state, start,
                            step_fn, row_fn, None, ckpt, batches, meta, ("loss", "kd_logits", "kd_hidden"))
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return XTCResult(state["params"][STUDENT], dict(state.get(BUFFERS, {})), history)
