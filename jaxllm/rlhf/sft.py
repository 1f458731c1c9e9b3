"""Step 1, supervised fine-tuning: next-token loss on `prompt + answer + EOS`, the prompt masked.

DeepSpeed-Chat's step 1 trains on every real token (its labels are the input ids); jaxllm masks the
prompt by default, so the model learns to answer rather than to write prompts, and
`sft.loss_on_prompt: true` restores DeepSpeed-Chat's behaviour. The task is pretraining's
(`jaxllm.pretraining`: the same loss, optimizer and engine step as `jaxllm.train`), and the workdir is a
`jaxllm.train` workdir in every respect: `python -m jaxllm.generate --workdir` reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxllm import runtime
from jaxllm.engine import loop
from jaxllm.engine.checkpoint import Checkpointer
from jaxllm.engine.step import evaluate
from jaxllm.pretraining import LanguageModelTraining
from jaxllm.rlhf import common
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import SFTRows


def run(config: RLHFConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) step 1; returns the last logged metrics row."""
    train_cfg, init = config.train, config.sft.init_workdir
    stage = common.start_stage(config, workdir, "sft", init, "sft.init_workdir")
    mesh, tokenizer, source, cfg = stage.mesh, stage.tokenizer, stage.source, stage.model
    width = config.data.max_seq_len
    rows = SFTRows.from_records(stage.train_rows, tokenizer, width, config.sft.loss_on_prompt)
    eval_rows = SFTRows.from_records(stage.held_out, tokenizer, width, config.sft.loss_on_prompt, "sft held-out")
    iterator, held_out = common.stage_batches(config, mesh, rows, eval_rows, "step-1 training rows")

    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(dataclasses.replace(config, model=cfg), mesh)
    ckpt = Checkpointer.for_run(workdir, config)
    origin = {"workdir": str(source.workdir), "step": source.step} if source else None
    meta = common.stage_meta(cfg, task.optimizer.signature(), "sft", tokenizer, init=origin,
                             loss_on_prompt=config.sft.loss_on_prompt) | task.model_def.slots_meta()

    def init_state():
        params = source.params if source else None
        if params is None and cfg.init_from:
            from jaxllm.interop import hf

            params = hf.load_params(cfg.init_from, cfg, task.load_shardings())
        return task.init_state(params)

    with jax.set_mesh(mesh):
        state, start = ckpt.resume_or_init(task.layout.abstract, iterator, meta, init_state)
        train_step = task.train_step(summarize=loop.logged_steps(config, start))
        eval_step = task.eval_step()
    tokens = train_cfg.batch_size * width
    step_fn = loop.batch_steps(train_step, iterator, mesh, train_cfg.batch_size)

    def row_fn(step, host, work, seconds, steps):
        return {"loss": float(host["loss"]), "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
                "tokens_per_sec": tokens * steps / seconds}

    def evaluate_fn(state, step):
        batches = [runtime.to_global(b, mesh, train_cfg.batch_size) for b in held_out]
        return {"eval_loss": evaluate(eval_step, state["params"], batches)["loss"]}

    with jax.set_mesh(mesh):
        _, last = loop.run(config, workdir, loop.Cadence.from_config(config), state, start, step_fn, row_fn,
                           evaluate_fn if held_out else None, ckpt, iterator, meta, ("loss", "eval_loss"))
    return last
