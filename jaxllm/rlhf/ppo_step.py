"""Step 3's jitted pieces: the experience phase (generation, then scoring) and the PPO update.

Models and their parameter trees (`PPOModels`): the actor and its frozen reference are `Decoder`s; the
critic and the frozen reward model are `ValueModel`s. A model trained with LoRA holds
`{"base", "lora"}` and is fused (`jaxllm.rlhf.lora.merge`) inside every function that reads it.

Experience (`make_generate`, `make_score`): the actor's current parameters, still on the devices in
their training layout, are fused and re-laid for inference (gathered over `fsdp` as DeepSpeed's hybrid
engine gathers ZeRO-3 shards, tensor-parallel shards kept) inside the generation `jit`, and
`jaxllm.generate.generate_tokens` samples with a KV cache; nothing goes through the host. Scoring then
runs the training forward of all four models over `prompt + answer` to get the old and reference
log-probabilities, the old values and the reward model's score, and computes rewards, advantages and
returns (`jaxllm.rlhf.losses`).

Update (`PPOUpdate`): the experience rows are cut into minibatches of `ppo.train_batch_size`; for each
of `ppo_epochs` epochs (minibatch order shuffled after the first), each minibatch takes one actor step
(clipped policy loss, plus PTX) and one critic step (clipped value loss) of the engine's train step,
then updates the actor EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm import mesh as mesh_lib
from jaxllm.engine.step import LossFn, make_train_step, split_micro
from jaxllm.generate import Generation, generate_tokens
from jaxllm.models.definition import ModelDef
from jaxllm.ops.cross_entropy import token_cross_entropy
from jaxllm.rlhf import lora
from jaxllm.rlhf.config import PPOConfig
from jaxllm.rlhf.losses import (
    gae_advantages,
    kl_penalized_rewards,
    last_token_values,
    policy_loss,
    token_logprobs,
    value_loss,
)
from jaxllm.rlhf.models import sequence_inputs


class Experience(NamedTuple):
    """One batch of experience; `[b, A]` arrays are in answer coordinates (see `jaxllm.rlhf.losses`)."""

    seq: Int[Array, "b l"]  # prompt (left-padded to P) + answer (right-padded to A)
    positions: Int[Array, "b l"]
    segment_ids: Int[Array, "b l"]
    mask: Float[Array, "b a"]  # answer tokens of rows with more than one answer token
    logprobs: Float[Array, "b a"]
    ref_logprobs: Float[Array, "b a"]
    values: Float[Array, "b a"]
    rewards: Float[Array, "b a"]
    advantages: Float[Array, "b a"]
    returns: Float[Array, "b a"]
    score: Float[Array, " b"]
    answer_length: Int[Array, " b"]
    valid: Float[Array, " b"]


@dataclasses.dataclass(frozen=True)
class Role:
    """A trained model of step 3: its definition and LoRA setting."""

    model_def: ModelDef
    lora_dim: int
    scaling: float
    only_lora: bool

    def params(self, trainable: Any, for_grad: bool = False) -> Any:
        """Plain params from the trainable tree (LoRA fused; frozen base cut from the gradient)."""
        if not self.lora_dim:
            return trainable
        base = jax.lax.stop_gradient(trainable["base"]) if for_grad and self.only_lora else trainable["base"]
        return lora.merge({"base": base, "lora": trainable["lora"]}, self.scaling / self.lora_dim)


@dataclasses.dataclass(frozen=True)
class PPOModels:
    actor: Role
    critic: Role
    ref_def: ModelDef  # the reference has the actor's definition
    reward_def: ModelDef
    prompt_width: int  # P
    answer_width: int  # A
    eos_id: int
    pad_id: int


def make_generate(models: PPOModels, cfg: PPOConfig, mesh, temperature: float | None = None):
    """jit(actor trainable params, prompt [b, P], prompt_length [b], key) -> `Generation` of A tokens.

    `temperature` overrides `cfg.temperature` (0 gives the greedy answers used for evaluation)."""
    actor = models.actor
    inference = mesh_lib.tree_shardings(mesh, actor.model_def.logical_axes, actor.model_def.shapes, drop=("fsdp",))
    temperature = cfg.temperature if temperature is None else temperature

    def generate(trainable, prompt, prompt_length, key) -> Generation:
        params = jax.lax.with_sharding_constraint(actor.params(trainable), inference)
        return generate_tokens(actor.model_def.bind(params), prompt, prompt_length, key,
                               max_new_tokens=models.answer_width, temperature=temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, stop_tokens=(models.eos_id,), pad_id=models.pad_id)

    return jax.jit(generate)


def answer_logprobs(model_def: ModelDef, params: Any, seq, positions, segment_ids, prompt_width: int):
    """[b, A] log-probabilities of the answer tokens (index P + j is predicted at P - 1 + j)."""
    logits = model_def.bind(params)(seq, positions, segment_ids)
    return token_logprobs(logits, seq)[:, prompt_width - 1:]


def answer_values(model_def: ModelDef, params: Any, seq, positions, segment_ids, prompt_width: int):
    """[b, A] values of the states before each answer token (indices P - 1 .. P + A - 2)."""
    return model_def.bind(params)(seq, positions, segment_ids)[:, prompt_width - 1:-1]


def make_score(models: PPOModels, cfg: PPOConfig, mesh):
    """jit(actor, ref, critic, reward params, prompt, prompt_length, answers, answer_length) ->
    (`Experience`, metrics). Rows whose answer has at most one token (EOS alone) are masked out, as
    DeepSpeed-Chat drops them."""
    P, A = models.prompt_width, models.answer_width

    def score(actor_trainable, ref_params, critic_trainable, reward_params, prompt, prompt_length, answers,
              answer_length):
        seq = jnp.concatenate([prompt, answers], axis=1)
        positions, segment_ids = sequence_inputs(prompt_length, answer_length, P, P + A)
        args = (seq, positions, segment_ids, P)
        logprobs = answer_logprobs(models.actor.model_def, models.actor.params(actor_trainable), *args)
        ref_logprobs = answer_logprobs(models.ref_def, ref_params, *args)
        values = answer_values(models.critic.model_def, models.critic.params(critic_trainable), *args)
        reward_values = models.reward_def.bind(reward_params)(seq, positions, segment_ids)
        score_ = last_token_values(reward_values, P + answer_length)
        valid = (answer_length > 1).astype(jnp.float32)
        mask = (jnp.arange(A)[None, :] < answer_length[:, None]).astype(jnp.float32) * valid[:, None]
        rewards = kl_penalized_rewards(logprobs, ref_logprobs, score_, mask, cfg.kl_ctl, cfg.clip_reward_value)
        advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        exp = Experience(seq, positions, segment_ids, mask, logprobs, ref_logprobs, values, rewards, advantages,
                         returns, score_, answer_length, valid)
        exp = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, mesh_lib.logical_to_spec(("batch",) + (None,) * (x.ndim - 1),
                                                                          mesh=mesh))), exp)
        n_valid = jnp.maximum(jnp.sum(valid), 1.0)
        metrics = {
            "reward_mean": jnp.sum(score_ * valid) / n_valid,
            "kl": jnp.sum((logprobs - ref_logprobs) * mask) / n_valid,  # per answer, sampled estimate
            "answer_length": jnp.mean(answer_length.astype(jnp.float32)),
            "dropped_answers": jnp.sum(1.0 - valid),
            "answer_tokens": jnp.sum(answer_length),
        }
        return exp, metrics

    return jax.jit(score)


def lm_loss(model_def: ModelDef, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over `loss_mask` (the PTX objective)."""
    logits = model_def.bind(params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"]
    return jnp.sum(token_cross_entropy(logits, batch["targets"]) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


PTX = "ptx_"  # prefix of the PTX rows' keys in an actor batch


def actor_loss_fn(models: PPOModels, cfg: PPOConfig) -> LossFn:
    """The actor's `jaxllm.engine.step.LossFn` on a batch of `Experience` fields (and `ptx_*` rows).

    The loss is the clipped policy loss, a mean over the batch's answer tokens; with PTX it is
    `(policy + unsup_coef * lm) / 2`, the gradient DeepSpeed-Chat takes when it doubles the actor's
    gradient accumulation for the PTX backward. The engine divides sums by the count, so the mean is
    returned times the answer-token count (the same for the aux metrics)."""

    def loss_fn(trainable, batch, ltd=None):
        mb = Experience(**{k: batch[k] for k in Experience._fields})
        params = models.actor.params(trainable, for_grad=True)
        logp = answer_logprobs(models.actor.model_def, params, mb.seq, mb.positions, mb.segment_ids,
                               models.prompt_width)
        pg, clip_fraction = policy_loss(logp, mb.logprobs, mb.advantages, mb.mask, cfg.cliprange)
        count = jnp.sum(mb.mask)
        stats = {"policy_loss": pg, "clip_fraction": clip_fraction,
                 "approx_kl": jnp.sum((mb.logprobs - logp) * mb.mask) / jnp.maximum(count, 1.0)}
        loss = pg
        if PTX + "inputs" in batch:
            stats["ptx_loss"] = lm_loss(models.actor.model_def, params,
                                        {k[len(PTX):]: v for k, v in batch.items() if k.startswith(PTX)})
            loss = (pg + cfg.unsup_coef * stats["ptx_loss"]) / 2
        return loss * count, count, {k: v * count for k, v in stats.items()}

    return loss_fn


def critic_loss_fn(models: PPOModels, cfg: PPOConfig) -> LossFn:
    """The critic's `LossFn`: the clipped value loss over the batch's answer tokens (times their count)."""

    def loss_fn(trainable, batch, ltd=None):
        params = models.critic.params(trainable, for_grad=True)
        values = answer_values(models.critic.model_def, params, batch["seq"], batch["positions"],
                               batch["segment_ids"], models.prompt_width)
        mask = batch["mask"]
        count = jnp.sum(mask)
        return value_loss(values, batch["values"], batch["returns"], mask, cfg.cliprange_value) * count, count, {}

    return loss_fn


def make_minibatches(cfg: PPOConfig, num_rows: int, mesh):
    """jit(experience, key) -> (minibatches `[M, rows, ...]`, update order `[epochs * M]`, answer tokens
    per minibatch `[M]`). The order is 0 .. M - 1 in the first epoch, then shuffled per epoch."""
    parts = num_rows // cfg.train_batch_size
    rows = jax.sharding.NamedSharding(mesh, mesh_lib.logical_to_spec((None, "batch"), mesh=mesh))

    def split(exp: Experience, key):
        minis = jax.lax.with_sharding_constraint(split_micro(exp._asdict(), parts), rows)  # each device keeps its rows
        orders = [jnp.arange(parts)] + [jax.random.permutation(jax.random.fold_in(key, e), parts)
                                        for e in range(1, cfg.ppo_epochs)]
        return minis, jnp.concatenate(orders), jnp.sum(minis["mask"], axis=(1, 2))

    return jax.jit(split)


def make_take(mesh):
    """jit(minibatches, index) -> the minibatch `index`, its rows laid out as a batch."""
    rows = jax.sharding.NamedSharding(mesh, mesh_lib.logical_to_spec(("batch",), mesh=mesh))
    return jax.jit(lambda minis, index: jax.tree.map(lambda x: x[index], minis), out_shardings=rows)


def make_ema(cfg: PPOConfig, params_shardings):
    """jit(ema, params) -> DeepSpeed-Chat's moving_average, `ema = beta * ema + (1 - beta) * theta`."""
    return jax.jit(lambda ema, params: jax.tree.map(lambda e, p: cfg.ema_beta * e + (1.0 - cfg.ema_beta) * p,
                                                     ema, params),
                   in_shardings=(params_shardings, params_shardings), out_shardings=params_shardings,
                   donate_argnums=0)


class PPOUpdate:
    """The update phase of a round: `update(state, experience, ptx, key) -> (state, metrics)`.

    The experience is cut into minibatches of `ppo.train_batch_size` rows; for each of `ppo_epochs`
    epochs each minibatch takes one actor step and one critic step of the engine
    (`jaxllm.engine.step.make_train_step`, so AdamW and the 1-bit optimizers alike), then the actor
    EMA is updated. A minibatch without a valid answer token is skipped by both models (counted in
    `skipped_steps`, left out of the means). The models' step counters are the optimizer updates done,
    `round * updates + u`, which drive their learning-rate schedules and 1-bit phases.
    """

    def __init__(self, models: PPOModels, cfg: PPOConfig, actor_opt, critic_opt, actor_layout, critic_layout,
                 mesh, num_rows: int, use_ema: bool):
        self.updates = cfg.ppo_epochs * (num_rows // cfg.train_batch_size)
        self.actor_step = make_train_step(actor_loss_fn(models, cfg), actor_opt, actor_layout)
        self.critic_step = make_train_step(critic_loss_fn(models, cfg), critic_opt, critic_layout)
        self.minibatches = make_minibatches(cfg, num_rows, mesh)
        self.take = make_take(mesh)
        self.ema = make_ema(cfg, actor_layout.state["params"]) if use_ema else None
        self.schedules = {"actor_lr": actor_opt.schedule, "critic_lr": critic_opt.schedule}
        self.counter = actor_layout.state["step"]  # the sharding of a step counter

    def _engine_state(self, model_state: dict, done: int) -> dict:
        put = lambda n: jax.device_put(np.int32(n), self.counter)  # noqa: E731
        return {"step": put(done), "skipped_steps": put(0), **model_state}

    def __call__(self, state: dict, exp: Experience, ptx: dict[str, jax.Array] | None, key):
        done = int(jax.device_get(state["step"])) * self.updates  # optimizer updates before this round
        actor = self._engine_state(state["actor"], done)
        critic = self._engine_state(state["critic"], done)
        ema = state.get("actor_ema")
        minis, order, tokens = self.minibatches(exp, key)
        order, tokens = jax.device_get((order, tokens))
        ptx_rows = None if ptx is None else jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), ptx)  # [U, rows, ...]
        skipped, actor_metrics, critic_metrics = 0, [], []
        for u, index in enumerate(order):
            if tokens[index] == 0:  # nothing to learn from: both models skip, their counters advance
                actor = {**actor, "step": actor["step"] + 1}
                critic = {**critic, "step": critic["step"] + 1}
                skipped += 2
                continue
            batch = self.take(minis, index)
            if ptx_rows is not None:
                batch |= {PTX + k: v[u] for k, v in ptx_rows.items()}
            actor, a_metrics = self.actor_step(actor, batch)
            critic, c_metrics = self.critic_step(critic, batch)
            if ema is not None:
                ema = self.ema(ema, actor["params"])
            actor_metrics.append(a_metrics)
            critic_metrics.append(c_metrics)
        new = {"step": state["step"] + 1,
               "skipped_steps": state["skipped_steps"] + skipped + actor["skipped_steps"] + critic["skipped_steps"],
               "actor": {"params": actor["params"], "opt_state": actor["opt_state"]},
               "critic": {"params": critic["params"], "opt_state": critic["opt_state"]}}
        if ema is not None:
            new["actor_ema"] = ema
        return new, self._metrics(actor_metrics, critic_metrics, done, ptx is not None)

    def _metrics(self, actor: list, critic: list, done: int, use_ptx: bool) -> dict[str, float]:
        actor, critic = jax.device_get((actor, critic))
        names = ["policy_loss", "clip_fraction", "approx_kl"] + (["ptx_loss"] if use_ptx else [])
        mean = lambda rows, key: float(np.mean([r[key] for r in rows])) if rows else float("nan")  # noqa: E731
        out = {k: mean(actor, k) for k in names}
        out |= {"value_loss": mean(critic, "loss"), "actor_grad_norm": mean(actor, "grad_norm"),
                "critic_grad_norm": mean(critic, "grad_norm")}
        return out | {k: float(schedule(done)) for k, schedule in self.schedules.items()}
