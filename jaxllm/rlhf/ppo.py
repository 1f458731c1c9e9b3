"""Step 3, PPO: the actor and a frozen reference start from step 1, the critic and a frozen reward model
from step 2 (DeepSpeed-Chat's `DeepSpeedRLHFEngine` + `DeepSpeedPPOTrainer`).

One training step (`train.steps` of them) is one round: `ppo.generation_batches` batches of
`ppo.generation_batch_size` prompts are answered by the actor (`jaxllm.rlhf.ppo_step.make_generate`,
KV-cache generation on the training devices) and scored (`make_score`: log-probabilities of actor and
reference, critic values, reward-model score, KL-penalised rewards, GAE); then `make_train` runs
`ppo_epochs` passes of actor and critic updates over minibatches of `ppo.train_batch_size` rows, with
optional PTX and actor EMA. Every logged row has `reward_mean`, `kl`, `policy_loss`, `value_loss` and
the wall-clock split of the round between `generation_time`, `scoring_time` and `training_time`
(seconds per round, averaged since the last row; the first row includes compilation). At
`eval.every` steps and at the end, the actor answers the held-out prompts greedily and
`eval_reward_mean` is the reward model's mean score of those answers.

The checkpoint holds the step, both trained models with their optimizer states and the EMA; the
frozen reference and reward model are re-read from their workdirs (at the checkpoint steps recorded
in `meta`) on resume.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import runtime
from jaxllm.config import ModelConfig
from jaxllm.data.pipeline import make_train_dataset, make_train_iterator, padded_eval_batches
from jaxllm.data.shards import file_sha256
from jaxllm.engine import loop, optimizer
from jaxllm.engine.checkpoint import Checkpointer, model_meta
from jaxllm.engine.onebit import is_onebit
from jaxllm.errors import UserError
from jaxllm.optim import build_optimizer, warmup_cosine
from jaxllm.rlhf import common, lora
from jaxllm.rlhf.config import RLHFConfig
from jaxllm.rlhf.data import PromptRows, SFTRows, read_text_rows, special_ids
from jaxllm.rlhf.models import actor_def, value_def
from jaxllm.rlhf.ppo_step import PPOModels, PPOUpdate, Role, make_generate, make_score


def _trainable_def(model_def, dim: int, module_name: str):
    """What `state_layout` needs (logical axes and shapes) of a model's trainable tree."""
    if not dim:
        return model_def
    axes, shapes = lora.lora_layout(model_def.logical_axes, model_def.shapes, module_name, dim)
    return SimpleNamespace(logical_axes={"base": model_def.logical_axes, "lora": axes},
                           shapes={"base": model_def.shapes, "lora": shapes})


def _optimizer(config: RLHFConfig, mesh, trainable, lr: float, lora_lr: float, dim: int, total: int
               ) -> optimizer.TrainOptimizer:
    """A trained model's optimizer over `total` updates; with LoRA, AdamW with the LoRA factors' own
    learning rate (and the base frozen with `ppo.only_optimize_lora`)."""
    train = config.train
    schedule = warmup_cosine(lr, train.warmup_steps, total, train.min_lr_ratio)
    if not dim:
        return optimizer.build(config, mesh, trainable, schedule=schedule, reads_params="PPO's generation")
    tx, _ = build_optimizer(config, schedule)
    lora_tx, _ = build_optimizer(config, warmup_cosine(lora_lr, train.warmup_steps, total, train.min_lr_ratio))
    base_tx = optax.set_to_zero() if config.ppo.only_optimize_lora else tx

    def labels(params):
        return {"base": jax.tree.map(lambda _: "base", params["base"]),
                "lora": jax.tree.map(lambda _: "lora", params["lora"])}

    return optimizer.TrainOptimizer(optax.multi_transform({"base": base_tx, "lora": lora_tx}, labels), schedule,
                                    offload=optimizer.offload_setting(config, "PPO's generation"))


def _structure(config: RLHFConfig) -> dict[str, Any]:
    """Settings that change the checkpoint's tree; a resumed run must keep them."""
    p = config.ppo
    return {"actor_lora_dim": p.actor_lora_dim, "critic_lora_dim": p.critic_lora_dim,
            "lora_module_name": p.lora_module_name, "lora_scaling": p.lora_scaling, "enable_ema": p.enable_ema}


def _check_tokenizers(tokenizer_file: Path, actor: common.Source, critic: common.Source) -> None:
    mine = file_sha256(tokenizer_file)
    for source, key in ((actor, "ppo.actor_workdir"), (critic, "ppo.critic_workdir")):
        theirs = source.tokenizer_sha256
        if theirs is None:
            raise UserError(f"config key '{key}': workdir '{source.workdir}' has no tokenizer (data/tokenizer.model "
                            "or data/tokenizer.json), so step 3 cannot check that it matches the other models")
        if theirs != mine:
            raise UserError(f"mismatched tokenizers: step 3 uses {tokenizer_file} (sha256 {mine[:12]}), but "
                            f"{key} '{source.workdir}' was trained with another one (sha256 {theirs[:12]}); the actor, "
                            "critic and reward model must share one tokenizer")


def run(config: RLHFConfig, workdir: Path) -> dict[str, Any]:
    """Runs (or resumes) step 3; returns the last logged metrics row."""
    p, train_cfg, zero = config.ppo, config.train, config.mesh.zero_stage
    for key in ("actor_workdir", "critic_workdir"):
        if not getattr(p, key):
            step = "step 1 (sft)" if key == "actor_workdir" else "step 2 (reward)"
            raise UserError(f"config key 'ppo.{key}': required; the workdir of {step}")
    for key in ("actor_lora_dim", "critic_lora_dim"):
        if is_onebit(config) and getattr(p, key):
            raise UserError(f"config key 'ppo.{key}': {config.optimizer.name} trains a model with one learning "
                            "rate, and LoRA gives its factors their own; set it to 0 or use optimizer.name=adamw")
    if train_cfg.loss_spike_factor:
        raise UserError("config key 'train.loss_spike_factor': PPO's policy loss changes sign from step to step, so "
                        "no multiple of its mean marks a spike; set it to 0 for step 3 (ppo)")
    mesh = runtime.start(config)
    runtime.make_directory(workdir)
    runtime.check_rows_divide(p.generation_batch_size, mesh, "ppo.generation_batch_size")
    runtime.check_rows_divide(p.train_batch_size, mesh, "ppo.train_batch_size")
    records, eval_records = common.load_records(config, workdir)
    train_rows, held_out = common.stage_split(config, records, eval_records, "ppo")
    tokenizer = common.setup_tokenizer(config, workdir, p.actor_workdir, records)

    ckpt = Checkpointer.for_run(workdir, config)
    start = ckpt.latest_step()
    recorded = ckpt.read_meta(start).get("rlhf", {}) if start is not None else {}
    if recorded and recorded.get("structure") != _structure(config):
        raise UserError(f"workdir '{workdir}' was trained with {recorded.get('structure')}, the config asks for "
                        f"{_structure(config)}; use another --workdir or the checkpoint's settings")
    compute = dataclasses.replace(ModelConfig(), compute_dtype=config.model.compute_dtype, remat=config.model.remat,
                                  attention_implementation=config.model.attention_implementation)
    with jax.set_mesh(mesh):
        actor_src = common.load_source(p.actor_workdir, "ppo.actor_workdir", "decoder", mesh, zero, compute,
                                       recorded.get("actor", {}).get("step"))
        critic_src = common.load_source(p.critic_workdir, "ppo.critic_workdir", "value", mesh, zero, compute,
                                        recorded.get("critic", {}).get("step"))
    _check_tokenizers(Path(tokenizer.path), actor_src, critic_src)
    P, A = config.data.max_prompt_seq_len, p.max_answer_seq_len
    for source, what in ((actor_src, "actor"), (critic_src, "critic")):
        common.check_tokenizer_fits(tokenizer, source.model, f"the {what} of {source.workdir}")
        if P + A > source.model.max_len:
            raise UserError(f"config key 'ppo.max_answer_seq_len': data.max_prompt_seq_len {P} + {A} = {P + A} "
                            f"tokens exceed the {what}'s max_len={source.model.max_len}")

    prompts = PromptRows(train_rows, tokenizer, P)
    common.say(prompts.report.line())
    if len(prompts) < p.generation_batch_size:
        raise UserError(f"config key 'ppo.generation_batch_size': {p.generation_batch_size} exceeds the {len(prompts)} "
                        f"step-3 prompts kept (of {len(train_rows)}; {prompts.report.dropped} longer than "
                        f"data.max_prompt_seq_len={P} were dropped)")
    eval_prompts = PromptRows(held_out, tokenizer, P, "ppo held-out")
    if len(eval_prompts):
        common.say(eval_prompts.report.line())
    ptx_rows = _ptx_rows(config, records, eval_records, tokenizer, actor_src.model)

    eos, pad = special_ids(tokenizer)
    a_def = actor_def(actor_src.model, tokenizer.vocab_size)
    c_def = value_def(critic_src.model)
    scaling = p.lora_scaling
    models = PPOModels(Role(a_def, p.actor_lora_dim, scaling, p.only_optimize_lora),
                       Role(c_def, p.critic_lora_dim, scaling, p.only_optimize_lora), a_def, c_def, P, A, eos, pad)
    num_rows = p.generation_batch_size * p.generation_batches
    updates = p.ppo_epochs * (num_rows // p.train_batch_size)
    total = train_cfg.steps * updates
    a_trainable = _trainable_def(a_def, p.actor_lora_dim, p.lora_module_name)
    c_trainable = _trainable_def(c_def, p.critic_lora_dim, p.lora_module_name)
    with jax.set_mesh(mesh):
        actor_opt = _optimizer(config, mesh, a_trainable, p.actor_learning_rate, p.actor_lora_learning_rate,
                               p.actor_lora_dim, total)
        critic_opt = _optimizer(config, mesh, c_trainable, p.critic_learning_rate, p.critic_lora_learning_rate,
                                p.critic_lora_dim, total)
        a_layout = actor_opt.layout(mesh, a_trainable, zero)
        c_layout = critic_opt.layout(mesh, c_trainable, zero)
    shardings, abstract = _state_layout(a_layout, c_layout, p.enable_ema)

    pidx, pcount = jax.process_index(), jax.process_count()
    iterator = make_train_iterator(prompts, p.generation_batch_size, config.seed, pidx, pcount)
    ptx_data = make_train_dataset(ptx_rows, p.train_batch_size, config.seed + 1, pidx, pcount) if ptx_rows else None
    meta = common.stage_meta(actor_src.model, actor_opt.signature(), "ppo", tokenizer,
                             critic_model=model_meta(critic_src.model),
                             actor={"workdir": str(actor_src.workdir), "step": actor_src.step},
                             critic={"workdir": str(critic_src.workdir), "step": critic_src.step},
                             structure=_structure(config))
    with jax.set_mesh(mesh):
        state, start = ckpt.resume_or_init(abstract, iterator, meta, lambda: _initial_state(
            config, models, actor_opt.tx, critic_opt.tx, actor_src.params, critic_src.params, shardings))
        generate = make_generate(models, p, mesh)
        score = make_score(models, p, mesh)
        train = PPOUpdate(models, p, actor_opt, critic_opt, a_layout, c_layout, mesh, num_rows, p.enable_ema)
        greedy = make_generate(models, p, mesh, temperature=0.0) if len(eval_prompts) else None

    def evaluate(state, step) -> dict[str, float]:
        return _evaluate(config, mesh, greedy, score, state, actor_src.params, critic_src.params, eval_prompts)

    round_fn = _round(config, mesh, iterator, generate, score, train, ptx_data, actor_src.params, critic_src.params,
                      updates)
    with jax.set_mesh(mesh):
        _, last = loop.run(config, workdir, loop.Cadence.from_config(config), state, start, round_fn, _row, evaluate,
                           ckpt, iterator, meta, ("reward_mean", "kl", "generation_fraction"))
    return last


def _state_layout(a_layout, c_layout, ema: bool) -> tuple[dict, dict]:
    def pick(tree, layout_tree):
        out = {"step": layout_tree["step"], "skipped_steps": layout_tree["skipped_steps"],
               "actor": {"params": tree[0]["params"], "opt_state": tree[0]["opt_state"]},
               "critic": {"params": tree[1]["params"], "opt_state": tree[1]["opt_state"]}}
        if ema:
            out["actor_ema"] = tree[0]["params"]
        return out

    return (pick((a_layout.state, c_layout.state), a_layout.state),
            pick((a_layout.abstract, c_layout.abstract), a_layout.abstract))


def _initial_state(config: RLHFConfig, models: PPOModels, actor_tx, critic_tx, actor_params, critic_params,
                   shardings) -> dict[str, Any]:
    p = config.ppo
    key = jax.random.key(config.seed)

    def trainable(params, role: Role, index: int):
        if not role.lora_dim:
            return params
        factors = lora.init_lora(params, role.model_def.logical_axes, p.lora_module_name, role.lora_dim,
                                 jax.random.fold_in(key, index))
        return {"base": params, "lora": factors}

    def init(actor_params, critic_params):
        a = trainable(actor_params, models.actor, 0)
        c = trainable(critic_params, models.critic, 1)
        zero = jnp.zeros((), jnp.int32)
        state = {"step": zero, "skipped_steps": zero, "actor": {"params": a, "opt_state": actor_tx.init(a)},
                 "critic": {"params": c, "opt_state": critic_tx.init(c)}}
        if p.enable_ema:
            state["actor_ema"] = jax.tree.map(jnp.copy, a)
        return state

    return jax.jit(init, out_shardings=shardings)(actor_params, critic_params)


def _ptx_rows(config: RLHFConfig, records, eval_records, tokenizer, actor_cfg: ModelConfig) -> SFTRows | None:
    source = config.ppo.unsupervised_data
    if not source:
        return None
    width = config.data.max_seq_len
    if width > actor_cfg.max_len:
        raise UserError(f"config key 'data.max_seq_len': {width} exceeds the actor's max_len={actor_cfg.max_len} "
                        "(PTX rows use data.max_seq_len)")
    if source == "sft":
        sft_rows, _ = common.stage_split(config, records, eval_records, "sft")
        rows = SFTRows.from_records(sft_rows, tokenizer, width, loss_on_prompt=True, name="ptx (step-1 rows)")
    else:
        rows = read_text_rows(source, tokenizer, width)
    common.say(rows.report.line())
    if len(rows) < config.ppo.train_batch_size:
        raise UserError(f"config key 'ppo.unsupervised_data': {len(rows)} rows, fewer than ppo.train_batch_size="
                        f"{config.ppo.train_batch_size}")
    return rows


def _ptx_batch(ptx_data, step: int, updates: int, mesh, rows: int) -> dict[str, jax.Array]:
    """The PTX rows of round `step` (0-based), one batch per update: `[rows, updates, width]` arrays.
    Batches are indexed by the update count, so a resumed run reads the same ones."""
    batches = [ptx_data[step * updates + u] for u in range(updates)]
    local = {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}
    return runtime.to_global(local, mesh, rows)


def _evaluate(config, mesh, greedy, score, state, ref_params, reward_params, prompts: PromptRows) -> dict[str, float]:
    """Greedy answers to the held-out prompts, scored by the reward model."""
    if greedy is None:
        return {}
    rows = config.ppo.generation_batch_size
    total, weight, length = 0.0, 0.0, 0.0
    key = jax.random.key(0)
    for batch in padded_eval_batches(prompts, rows, config.eval.batches, jax.process_index(), jax.process_count()):
        w = batch["weight"]
        batch = runtime.to_global({k: batch[k] for k in ("prompt", "prompt_length")}, mesh, rows)
        out = greedy(state["actor"]["params"], batch["prompt"], batch["prompt_length"], key)
        exp, _ = score(state["actor"]["params"], ref_params, state["critic"]["params"], reward_params,
                       batch["prompt"], batch["prompt_length"], out.tokens, out.lengths)
        scores, lengths = jax.device_get((exp.score, exp.answer_length))  # one process: all rows
        w = w if len(w) == len(scores) else np.ones(len(scores), np.float32)
        total += float(np.sum(scores * w))
        length += float(np.sum(lengths * w))
        weight += float(np.sum(w))
    n = max(weight, 1.0)
    return {"eval_reward_mean": total / n, "eval_answer_length": length / n}


def _round(config: RLHFConfig, mesh, iterator, generate, score, train, ptx_data, ref_params, reward_params,
           updates: int):
    """One training step of step 3 for the engine's loop: generate and score `ppo.generation_batches`
    batches of answers, then train on them. Its host numbers are the round's means and wall-clock split."""
    p = config.ppo
    base_key = jax.random.key(config.seed)

    def round_fn(state, step):
        round_key = jax.random.fold_in(base_key, step)
        times = {"generation_time": 0.0, "scoring_time": 0.0, "training_time": 0.0}
        experiences, exp_metrics = [], []
        for g in range(p.generation_batches):
            batch = runtime.to_global(next(iterator), mesh, p.generation_batch_size)
            t0 = time.perf_counter()
            out = jax.block_until_ready(generate(state["actor"]["params"], batch["prompt"], batch["prompt_length"],
                                                 jax.random.fold_in(round_key, g)))
            t1 = time.perf_counter()
            exp, metrics = jax.block_until_ready(score(
                state["actor"]["params"], ref_params, state["critic"]["params"], reward_params, batch["prompt"],
                batch["prompt_length"], out.tokens, out.lengths))
            times["generation_time"] += t1 - t0
            times["scoring_time"] += time.perf_counter() - t1
            experiences.append(exp)
            exp_metrics.append(jax.device_get(metrics))
        exp = experiences[0] if len(experiences) == 1 else \
            jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *experiences)
        ptx = None if ptx_data is None else _ptx_batch(ptx_data, step, updates, mesh, p.train_batch_size)
        t2 = time.perf_counter()
        train_key = jax.random.fold_in(round_key, p.generation_batches)  # generation used 0 .. G - 1
        state, metrics = train(state, exp, ptx, train_key)
        jax.block_until_ready(state)
        times["training_time"] = time.perf_counter() - t2
        done = {k: float(np.mean([m[k] for m in exp_metrics])) for k in exp_metrics[0] if k != "answer_tokens"}
        done["answer_tokens"] = float(sum(m["answer_tokens"] for m in exp_metrics))
        done.update(metrics, **times)
        return state, {}, done

    return round_fn


def _row(step: int, host, sums: dict[str, float], seconds: float, rounds: int) -> dict[str, Any]:
    """The logged row: each number's mean over the rounds since the last row, the share of a round spent
    generating, and the generation speed."""
    mean = {k: v / rounds for k, v in sums.items()}
    busy = mean["generation_time"] + mean["scoring_time"] + mean["training_time"]
    row = {k: v for k, v in mean.items() if k != "answer_tokens"}
    row["generation_fraction"] = mean["generation_time"] / busy
    row["generated_tokens_per_sec"] = mean["answer_tokens"] / max(mean["generation_time"], 1e-9)
    return row
