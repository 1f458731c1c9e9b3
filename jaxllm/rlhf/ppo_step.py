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

Update (`make_train`): the experience rows are cut into minibatches of `ppo.train_batch_size`; for each
of `ppo_epochs` epochs (minibatch order shuffled after the first), each minibatch takes one actor step
(clipped policy loss, plus PTX) and one critic step (clipped value loss), then updates the actor EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from jaxllm import mesh as mesh_lib
from jaxllm.generate import Generation, generate_tokens
from jaxllm.models.definition import ModelDef
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


def _split_rows(x: jax.Array, parts: int) -> jax.Array:
    """[N, ...] -> [parts, N / parts, ...] with rows i * parts + m in part m (each device keeps its rows)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 0, 1)


def lm_loss(model_def: ModelDef, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over `loss_mask` (the PTX objective)."""
    logits = model_def.bind(params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _apply(tx, grads, opt_state, params, ok):
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt, opt_state)


def make_train(models: PPOModels, cfg: PPOConfig, actor_tx, critic_tx, actor_schedule, critic_schedule,
               state_shardings, num_rows: int, use_ptx: bool, use_ema: bool):
    """jit(state, experience, ptx batch or None, key) -> (state, metrics) over all updates of one round.

    The actor's loss is the clipped policy loss; with PTX it is `(policy + unsup_coef * lm) / 2`, the
    gradient DeepSpeed-Chat takes when it doubles the actor's gradient accumulation for the PTX
    backward. Each model's update is skipped (and counted) when its loss or gradient is not finite
    or the minibatch holds no valid answer token.
    """
    minibatches = num_rows // cfg.train_batch_size
    P = models.prompt_width

    def actor_loss(trainable, mb: Experience, ptx):
        params = models.actor.params(trainable, for_grad=True)
        logp = answer_logprobs(models.actor.model_def, params, mb.seq, mb.positions, mb.segment_ids, P)
        pg, clip_fraction = policy_loss(logp, mb.logprobs, mb.advantages, mb.mask, cfg.cliprange)
        approx_kl = jnp.sum((mb.logprobs - logp) * mb.mask) / jnp.maximum(jnp.sum(mb.mask), 1.0)
        ptx_loss = lm_loss(models.actor.model_def, params, ptx) if ptx is not None else jnp.float32(0)
        loss = (pg + cfg.unsup_coef * ptx_loss) / 2 if ptx is not None else pg
        return loss, {"policy_loss": pg, "clip_fraction": clip_fraction, "approx_kl": approx_kl, "ptx_loss": ptx_loss}

    def critic_loss(trainable, mb: Experience):
        params = models.critic.params(trainable, for_grad=True)
        values = answer_values(models.critic.model_def, params, mb.seq, mb.positions, mb.segment_ids, P)
        return value_loss(values, mb.values, mb.returns, mb.mask, cfg.cliprange_value)

    actor_grad = jax.value_and_grad(actor_loss, has_aux=True)
    critic_grad = jax.value_and_grad(critic_loss)

    def train(state, exp: Experience, ptx, key):
        minis = jax.tree.map(lambda x: _split_rows(x, minibatches), exp)
        orders = [jnp.arange(minibatches)] + [jax.random.permutation(jax.random.fold_in(key, e), minibatches)
                                              for e in range(1, cfg.ppo_epochs)]
        order = jnp.concatenate(orders)
        ptx_seq = None if ptx is None else jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), ptx)  # [U, bs, ...]

        def update(state, inputs):
            u, index = inputs
            mb = jax.tree.map(lambda x: x[index], minis)
            ptx_mb = None if ptx_seq is None else jax.tree.map(lambda x: x[u], ptx_seq)
            has_tokens = jnp.sum(mb.mask) > 0
            actor, critic = state["actor"], state["critic"]
            (a_loss, stats), a_grads = actor_grad(actor["params"], mb, ptx_mb)
            a_norm = optax.tree.norm(a_grads)
            a_ok = jnp.isfinite(a_loss) & jnp.isfinite(a_norm) & has_tokens
            a_params, a_opt = _apply(actor_tx, a_grads, actor["opt_state"], actor["params"], a_ok)
            c_loss, c_grads = critic_grad(critic["params"], mb)
            c_norm = optax.tree.norm(c_grads)
            c_ok = jnp.isfinite(c_loss) & jnp.isfinite(c_norm) & has_tokens
            c_params, c_opt = _apply(critic_tx, c_grads, critic["opt_state"], critic["params"], c_ok)
            skipped = (~a_ok).astype(jnp.int32) + (~c_ok).astype(jnp.int32)
            new = {"step": state["step"], "skipped_steps": state["skipped_steps"] + skipped,
                   "actor": {"params": a_params, "opt_state": a_opt},
                   "critic": {"params": c_params, "opt_state": c_opt}}
            if use_ema:  # DeepSpeed-Chat's moving_average: ema = beta * ema + (1 - beta) * theta
                new["actor_ema"] = jax.tree.map(lambda e, p: cfg.ema_beta * e + (1.0 - cfg.ema_beta) * p,
                                                state["actor_ema"], a_params)
            new = jax.lax.with_sharding_constraint(new, state_shardings)
            return new, {**stats, "value_loss": c_loss, "actor_grad_norm": a_norm, "critic_grad_norm": c_norm}

        updates = jnp.arange(order.shape[0])
        state, per_update = jax.lax.scan(update, state, (updates, order))
        metrics = jax.tree.map(jnp.mean, per_update)
        done = state["step"] * order.shape[0]  # optimizer updates before this round
        metrics["actor_lr"] = actor_schedule(done)
        metrics["critic_lr"] = critic_schedule(done)
        if ptx is None:
            del metrics["ptx_loss"]
        state = {**state, "step": state["step"] + 1}
        return state, metrics

    return jax.jit(train, in_shardings=(state_shardings, None, None, None), out_shardings=(state_shardings, None),
                   donate_argnums=0)
