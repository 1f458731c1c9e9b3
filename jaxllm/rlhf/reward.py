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

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import runtime
from jaxllm.engine import loop, optimizer
from jaxllm.engine.checkpoint import Checkpointer
from jaxllm.engine.state import initial_state
from jaxllm.engine.step import evaluate, make_eval_step, make_train_step
from jaxllm.ltd import LTDPlan
from jaxllm.models.definition import ModelDef
from jaxllm.rlhf import common
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import PairRows
from jaxllm.rlhf.losses import pairwise_loss
from jaxllm.rlhf.models import VALUE_HEAD, init_value_params, right_padded_inputs, value_def


def pair_outputs(model_def: ModelDef, params: Any, batch: dict[str, jax.Array]):
    """`PairwiseOutput` of a batch of pairs: both answers in one forward pass of `2 x batch` rows."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]], axis=0)
    positions, segment_ids = right_padded_inputs(lengths, tokens.shape[1])
    values = model_def.bind(params)(tokens, positions, segment_ids)
    chosen_values, rejected_values = jnp.split(values, 2, axis=0)
    return pairwise_loss(chosen_values, rejected_values, batch["chosen"], batch["rejected"],
                         batch["chosen_length"], batch["rejected_length"])


def pair_loss_sums(model_def: ModelDef, params: Any, batch: dict[str, jax.Array], ltd: LTDPlan | None = None
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The reward model's `LossFn`: the summed pairwise loss, the number of pairs, and as aux sums the
    correctly ordered pairs (`accuracy`) and both answers' scores. Rows with `weight` 0 fill up a
    held-out batch and count for nothing. (No RLHF step drops tokens, so `ltd` is always None.)"""
    out = pair_outputs(model_def, params, batch)
    weight = batch.get("weight", jnp.ones_like(out.loss))
    return jnp.sum(out.loss * weight), jnp.sum(weight), {
        "accuracy": jnp.sum((out.chosen_score > out.rejected_score) * weight),
        "chosen_score": jnp.sum(out.chosen_score * weight),
        "rejected_score": jnp.sum(out.rejected_score * weight),
    }


def run(config: RLHFConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) step 2; returns the last logged metrics row."""
    train_cfg, init = config.train, config.reward.init_workdir
    stage = common.start_stage(config, workdir, "reward", init, "reward.init_workdir")
    mesh, tokenizer, source, cfg = stage.mesh, stage.tokenizer, stage.source, stage.model
    width = config.data.max_seq_len
    pairs = PairRows(stage.train_rows, tokenizer, width)
    eval_pairs = PairRows(stage.held_out, tokenizer, width, "reward held-out")
    iterator, held_out = common.stage_batches(config, mesh, pairs, eval_pairs, "step-2 training pairs")

    model_def = value_def(cfg)
    with jax.set_mesh(mesh):
        opt = optimizer.build(config, mesh, model_def)
        layout = opt.layout(mesh, model_def, config.mesh.zero_stage)
    ckpt = Checkpointer.for_run(workdir, config)
    origin = {"workdir": str(source.workdir), "step": source.step} if source else None
    meta = common.stage_meta(cfg, opt.signature(), "reward", tokenizer, init=origin, value_head=True)

    def init_state():
        decoder = source.params if source else None
        if decoder is None and cfg.init_from:
            from jaxllm.interop import hf

            decoder = hf.load_params(cfg.init_from, cfg, layout.state["params"]["decoder"])
        if decoder is None:
            return initial_state(layout, opt.tx, lambda: init_value_params(cfg, config.seed))
        head = jax.jit(lambda: init_value_params(cfg, config.seed)[VALUE_HEAD],
                       out_shardings=layout.state["params"][VALUE_HEAD])()
        return initial_state(layout, opt.tx, {"decoder": decoder, VALUE_HEAD: head})

    loss = functools.partial(pair_loss_sums, model_def)
    with jax.set_mesh(mesh):
        state, start = ckpt.resume_or_init(layout.abstract, iterator, meta, init_state)
        logged = loop.logged_steps(config, start)
        train_step = make_train_step(loss, opt, layout, train_cfg.grad_accum, summarize=logged)
        eval_step = make_eval_step(loss, layout.state["params"])
    step_fn = loop.batch_steps(train_step, iterator, mesh, train_cfg.batch_size)

    def row_fn(step, host, work, seconds, steps):
        return {k: float(host[k]) for k in ("loss", "accuracy", "chosen_score", "rejected_score", "lr", "grad_norm")} \
            | {"pairs_per_sec": train_cfg.batch_size * steps / seconds}

    def evaluate_fn(state, step):
        out = evaluate(eval_step, state["params"], [runtime.to_global(b, mesh, train_cfg.batch_size)
                                                    for b in held_out])
        return {"eval_loss": out["loss"], "reward_accuracy": out["accuracy"],
                "eval_chosen_score": out["chosen_score"], "eval_rejected_score": out["rejected_score"],
                "eval_pairs": int(out["count"])}

    with jax.set_mesh(mesh):
        _, last = loop.run(config, workdir, loop.Cadence.from_config(config), state, start, step_fn, row_fn,
                           evaluate_fn if held_out else None, ckpt, iterator, meta, ("loss", "reward_accuracy"))
    return last
