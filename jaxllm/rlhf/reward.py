"""Step 2, the reward model: a value head on the decoder trained on preference pairs.

Each batch runs `[chosen; rejected]` through the `ValueModel` (one value per token) and minimises
`jaxllm.rlhf.losses.pairwise_loss`, DeepSpeed-Chat's loss over the span where the answers differ,
averaged over pairs. An answer's score is the value at its last real token (EOS); `reward_accuracy`
is the fraction of held-out pairs whose chosen answer scores higher, logged with `eval_loss` every
`eval.every` steps and at the end. The decoder starts from `reward.init_workdir` (DeepSpeed-Chat
starts from a pre-trained model; an SFT workdir works too), `model.init_from` or from scratch; the
value head from N(0, model.init_std^2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm import mesh as mesh_lib
from jaxllm.checkpoint import Checkpointer
from jaxllm.data.pipeline import make_train_iterator
from jaxllm.errors import UserError
from jaxllm.rlhf import common
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import PairRows
from jaxllm.rlhf.loop import eval_batches, train_loop
from jaxllm.rlhf.losses import pairwise_loss
from jaxllm.rlhf.models import VALUE_HEAD, init_value_params, right_padded_inputs, value_def
from jaxllm.rlhf.sft import check_seq_len, fresh_model_config
from jaxllm.state import ModelDef, StateLayout, state_layout


def pair_outputs(model_def: ModelDef, params: Any, batch: dict[str, jax.Array]):
    """`PairwiseOutput` of a batch of pairs: both answers in one forward pass of `2 x batch` rows."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]], axis=0)
    positions, segment_ids = right_padded_inputs(lengths, tokens.shape[1])
    values = model_def.bind(params)(tokens, positions, segment_ids)
    chosen_values, rejected_values = jnp.split(values, 2, axis=0)
    return pairwise_loss(chosen_values, rejected_values, batch["chosen"], batch["rejected"],
                         batch["chosen_length"], batch["rejected_length"])


def _sums(model_def: ModelDef, params: Any, batch: dict[str, jax.Array]):
    out = pair_outputs(model_def, params, batch)
    weight = batch.get("weight", jnp.ones_like(out.loss))
    return jnp.sum(out.loss * weight), {
        "pairs": jnp.sum(weight),
        "correct": jnp.sum((out.chosen_score > out.rejected_score) * weight),
        "chosen_score": jnp.sum(out.chosen_score * weight),
        "rejected_score": jnp.sum(out.rejected_score * weight),
    }


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    layout: StateLayout, grad_accum: int = 1):
    """The jitted step: mean pairwise loss over the global batch (accumulated over `grad_accum`
    micro-batches); a non-finite loss or gradient leaves the state unchanged and counts as skipped."""
    grad_fn = jax.value_and_grad(lambda p, b: _sums(model_def, p, b), has_aux=True)

    def step(state, batch):
        params = state["params"]

        def accumulate(carry, micro):
            grads_sum, loss_sum, stats_sum = carry
            (loss, stats), grads = grad_fn(params, micro)
            grads = jax.lax.with_sharding_constraint(grads, layout.grads)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
                    jax.tree.map(jnp.add, stats_sum, stats)), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), layout.grads)
        stats0 = {k: jnp.float32(0) for k in ("pairs", "correct", "chosen_score", "rejected_score")}
        if grad_accum == 1:
            (grads, loss, stats), _ = accumulate((zeros, jnp.float32(0), stats0), batch)
        else:  # rows i * accum + a form micro-batch a, so each device keeps its rows
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum,
                                                                  *x.shape[1:]), 0, 1), batch)
            (grads, loss, stats), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), stats0), micro)
        pairs = jnp.maximum(stats["pairs"], 1.0)
        grads = jax.tree.map(lambda g: g / pairs, grads)
        loss = loss / pairs
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"step": state["step"] + 1, "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
                     "params": keep(new_params, params), "opt_state": keep(new_opt, state["opt_state"])}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "accuracy": stats["correct"] / pairs, "chosen_score": stats["chosen_score"] / pairs,
                   "rejected_score": stats["rejected_score"] / pairs}
        return new_state, metrics

    return jax.jit(step, in_shardings=(layout.state, None), out_shardings=(layout.state, None), donate_argnums=0)


def run(config: RLHFConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) step 2; returns the last logged metrics row."""
    from jaxllm.train import init_distributed

    init_distributed(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    train_cfg, zero = config.train, config.mesh.zero_stage
    common.check_divides(train_cfg.batch_size // train_cfg.grad_accum, mesh, "train.batch_size")
    records, eval_records = common.load_records(config, workdir)
    train_rows, held_out = common.stage_split(config, records, eval_records, "reward")
    init = config.reward.init_workdir
    tokenizer = common.setup_tokenizer(config, workdir, init, records)
    with jax.set_mesh(mesh):
        source = common.load_source(init, "reward.init_workdir", "decoder", mesh, zero, config.model) if init else None
    cfg = source.model if source else fresh_model_config(config, tokenizer)
    common.check_tokenizer_fits(tokenizer, cfg, f"the model of {init}" if init else "the model")
    check_seq_len(config, cfg)

    width = config.data.max_seq_len
    pairs = PairRows(train_rows, tokenizer, width)
    common.say(pairs.report.line())
    if len(pairs) < train_cfg.batch_size:
        raise UserError(f"config key 'train.batch_size': {train_cfg.batch_size} exceeds the {len(pairs)} step-2 "
                        "training pairs left after data_split")
    eval_pairs = PairRows(held_out, tokenizer, width, "reward held-out")
    if len(eval_pairs):
        common.say(eval_pairs.report.line())

    model_def = value_def(cfg)
    tx, schedule = common.adamw(config.optimizer, train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps,
                                train_cfg.min_lr_ratio)
    with jax.set_mesh(mesh):
        layout = state_layout(mesh, model_def, tx, zero)
    pidx, pcount = jax.process_index(), jax.process_count()
    iterator = make_train_iterator(pairs, train_cfg.batch_size, config.seed, pidx, pcount)
    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    origin = {"workdir": str(source.workdir), "step": source.step} if source else None
    meta = common.base_meta(cfg, "reward", tokenizer, init=origin, value_head=True)
    start = ckpt.latest_step()
    with jax.set_mesh(mesh):
        if start is not None:
            ckpt.check_compatible(start, meta["model"])
            state = ckpt.restore(start, layout.abstract, iterator)
        else:
            start = 0
            state = initial_state(config, cfg, tx, layout, source.params if source else None)
        train_step = make_train_step(model_def, tx, schedule, layout, train_cfg.grad_accum)
        eval_step = jax.jit(lambda p, b: _sums(model_def, p, b), in_shardings=(layout.state["params"], None))
    batches = eval_batches(eval_pairs, train_cfg.batch_size, config.eval.batches, pidx, pcount) if len(eval_pairs) \
        else []

    def evaluate(state):
        return evaluate_pairs(eval_step, state["params"], batches, mesh, train_cfg.batch_size)

    def row_fn(host, seconds, steps):
        return {k: float(host[k]) for k in ("loss", "accuracy", "chosen_score", "rejected_score", "lr", "grad_norm")} \
            | {"pairs_per_sec": train_cfg.batch_size * steps / seconds}

    with jax.set_mesh(mesh):
        _, last = train_loop(config, workdir, state, start, train_step,
                             lambda: common.to_global(next(iterator), mesh, train_cfg.batch_size), ckpt, iterator,
                             meta, evaluate, row_fn, ("loss", "reward_accuracy"))
    return last


def evaluate_pairs(eval_step, params: Any, batches: list, mesh, rows: int) -> dict[str, float]:
    """Held-out metrics: `eval_loss`, `reward_accuracy` and the mean scores, over every held-out pair."""
    if not batches:
        return {}
    totals = {"loss": 0.0, "pairs": 0.0, "correct": 0.0, "chosen_score": 0.0, "rejected_score": 0.0}
    for batch in batches:
        loss, stats = eval_step(params, common.to_global(batch, mesh, rows))
        totals["loss"] += float(loss)
        for k, v in stats.items():
            totals[k] += float(v)
    n = max(totals["pairs"], 1.0)
    return {"eval_loss": totals["loss"] / n, "reward_accuracy": totals["correct"] / n,
            "eval_chosen_score": totals["chosen_score"] / n, "eval_rejected_score": totals["rejected_score"] / n,
            "eval_pairs": int(totals["pairs"])}


def initial_state(config: RLHFConfig, cfg, tx, layout: StateLayout, decoder: Any | None) -> dict[str, Any]:
    """Step-0 state: the decoder from `decoder` params, `model.init_from` or fresh; a fresh value head."""
    if decoder is None and cfg.init_from:
        from jaxllm.interop import hf

        decoder = hf.load_params(cfg.init_from, cfg, layout.state["params"]["decoder"])

    def init(decoder):
        params = init_value_params(cfg, config.seed)
        if decoder is not None:
            params = {"decoder": decoder, VALUE_HEAD: params[VALUE_HEAD]}
        zero = jnp.zeros((), jnp.int32)
        return {"step": zero, "skipped_steps": zero, "params": params, "opt_state": tx.init(params)}

    return jax.jit(init, out_shardings=layout.state)(decoder)
