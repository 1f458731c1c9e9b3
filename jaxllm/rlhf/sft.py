"""Step 1, supervised fine-tuning: next-token loss on `prompt + answer + EOS`, the prompt masked.

DeepSpeed-Chat's step 1 trains on every real token (its labels are the input ids); jaxllm masks the
prompt by default, so the model learns to answer rather than to write prompts, and
`sft.loss_on_prompt: true` restores DeepSpeed-Chat's behaviour. The step itself is `jaxllm.step`'s
(the same loss, gradient accumulation and skip-on-non-finite as pre-training), and the workdir is a
`jaxllm.train` workdir in every respect: `python -m jaxllm.generate --workdir` reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import mesh as mesh_lib
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import ModelConfig
from jaxllm.data.pipeline import make_train_iterator
from jaxllm.data.tokenizer import TextTokenizer
from jaxllm.errors import UserError
from jaxllm.rlhf import common
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import SFTRows
from jaxllm.rlhf.loop import eval_batches, train_loop
from jaxllm.state import ModelDef, create_state, state_layout
from jaxllm.step import make_eval_step, make_train_step


def fresh_model_config(config: RLHFConfig, tokenizer: TextTokenizer) -> ModelConfig:
    """The `model` section for a model trained from scratch or from `model.init_from`.

    From scratch, a vocabulary size left at its default follows the tokenizer.
    """
    cfg = config.model
    if cfg.init_from:
        from jaxllm.interop import hf

        cfg = hf.resolve_model_config(cfg, cfg.init_from)
    elif cfg.vocab_size == ModelConfig().vocab_size and tokenizer.vocab_size != cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    cfg.validate()
    common.check_tokenizer_fits(tokenizer, cfg, "the model")
    return cfg


def check_seq_len(config: RLHFConfig, cfg: ModelConfig) -> None:
    if config.data.max_seq_len > cfg.max_len:
        raise UserError(f"config key 'data.max_seq_len': got {config.data.max_seq_len}; expected at most the "
                        f"model's max_len={cfg.max_len}")


def run(config: RLHFConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) step 1; returns the last logged metrics row."""
    from jaxllm.train import init_distributed

    init_distributed(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    train_cfg, zero = config.train, config.mesh.zero_stage
    common.check_divides(train_cfg.batch_size // train_cfg.grad_accum, mesh, "train.batch_size")
    records, eval_records = common.load_records(config, workdir)
    train_rows, held_out = common.stage_split(config, records, eval_records, "sft")
    init = config.sft.init_workdir
    tokenizer = common.setup_tokenizer(config, workdir, init, records)

    with jax.set_mesh(mesh):
        source = common.load_source(init, "sft.init_workdir", "decoder", mesh, zero, config.model) if init else None
    cfg = source.model if source else fresh_model_config(config, tokenizer)
    common.check_tokenizer_fits(tokenizer, cfg, f"the model of {init}" if init else "the model")
    check_seq_len(config, cfg)

    width = config.data.max_seq_len
    rows = SFTRows.from_records(train_rows, tokenizer, width, config.sft.loss_on_prompt)
    common.say(rows.report.line())
    if len(rows) < train_cfg.batch_size:
        raise UserError(f"config key 'train.batch_size': {train_cfg.batch_size} exceeds the {len(rows)} step-1 "
                        "training rows left after data_split")
    eval_rows = SFTRows.from_records(held_out, tokenizer, width, config.sft.loss_on_prompt, "sft held-out")
    if len(eval_rows):
        common.say(eval_rows.report.line())

    model_def = ModelDef.from_config(cfg)
    tx, schedule = common.adamw(config.optimizer, train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps,
                                train_cfg.min_lr_ratio)
    with jax.set_mesh(mesh):
        layout = state_layout(mesh, model_def, tx, zero)
    pidx, pcount = jax.process_index(), jax.process_count()
    iterator = make_train_iterator(rows, train_cfg.batch_size, config.seed, pidx, pcount)
    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    origin = {"workdir": str(source.workdir), "step": source.step} if source else None
    meta = common.base_meta(cfg, "sft", tokenizer, init=origin, loss_on_prompt=config.sft.loss_on_prompt)
    start = ckpt.latest_step()
    with jax.set_mesh(mesh):
        if start is not None:
            ckpt.check_compatible(start, meta["model"])
            state = ckpt.restore(start, layout.abstract, iterator)
        else:
            start = 0
            state = initial_state(config, cfg, tx, layout, source.params if source else None)
        train_step = make_train_step(model_def, tx, schedule, layout, train_cfg.grad_accum)
        eval_step = make_eval_step(model_def, layout)
    batches = eval_batches(eval_rows, train_cfg.batch_size, config.eval.batches, pidx, pcount) if len(eval_rows) else []

    def evaluate(state):
        if not batches:
            return {}
        total, count = 0.0, 0.0
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "weight"} | \
                {"loss_mask": batch["loss_mask"] * batch["weight"][:, None]}
            s, n = eval_step(state["params"], common.to_global(batch, mesh, train_cfg.batch_size))
            total, count = total + float(s), count + float(n)
        return {"eval_loss": total / max(count, 1.0)}

    tokens = train_cfg.batch_size * width

    def row_fn(host, seconds, steps):
        return {"loss": float(host["loss"]), "lr": float(host["lr"]), "grad_norm": float(host["grad_norm"]),
                "tokens_per_sec": tokens * steps / seconds}

    with jax.set_mesh(mesh):
        _, last = train_loop(config, workdir, state, start, train_step,
                             lambda: common.to_global(next(iterator), mesh, train_cfg.batch_size), ckpt, iterator,
                             meta, evaluate, row_fn, ("loss", "eval_loss"))
    return last


def initial_state(config: RLHFConfig, cfg: ModelConfig, tx, layout, params: Any | None) -> dict[str, Any]:
    """Step-0 state: given params, `model.init_from` weights, or a fresh initialisation."""
    if params is None and cfg.init_from:
        from jaxllm.interop import hf

        params = hf.load_params(cfg.init_from, cfg, layout.state["params"])
    if params is None:
        return create_state(cfg, config.seed, tx, layout)

    def init(params):
        zero = jnp.zeros((), jnp.int32)
        return {"step": zero, "skipped_steps": zero, "params": params, "opt_state": tx.init(params)}

    return jax.jit(init, out_shardings=layout.state)(params)
