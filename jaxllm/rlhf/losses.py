"""The RLHF objectives as pure functions of arrays: pairwise reward loss, KL-penalised rewards, GAE and
PPO's clipped policy and value losses.

Step 3 works in *answer coordinates*: prompts are left-padded to a common width `P`, so answer token
`j` of every row sits at sequence index `P + j` and is predicted at index `P - 1 + j` (DeepSpeed-Chat's
`start = P - 1`). Arrays `[batch, A]` hold per-answer-token quantities and `mask[b, j] = 1` for the `n_b`
real answer tokens of row `b` (its EOS included), which is DeepSpeed-Chat's `action_mask[:, start:]`.

References: Ouyang et al., 2022, "Training language models to follow instructions with human
feedback" (reward model, KL-penalised PPO, PTX); Schulman et al., 2017, "Proximal Policy Optimization
Algorithms" (clipped objective); Schulman et al., 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation" (GAE). Constants and conventions follow DeepSpeed-Chat
(`dschat/rlhf/ppo_trainer.py`, `dschat/utils/model/reward_model.py`) except where noted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxllm.ops.cross_entropy import token_cross_entropy


def token_logprobs(logits: Float[Array, "b l vocab"], tokens: Int[Array, "b l"]) -> Float[Array, "b l-1"]:
    """log p(tokens[:, t + 1] | tokens[:, :t + 1]) from next-token logits, in f32."""
    return -token_cross_entropy(logits[:, :-1], tokens[:, 1:])


def last_token_values(values: Float[Array, "b l"], lengths: Int[Array, " b"]) -> Float[Array, " b"]:
    """The value at each row's last real token, index `length - 1` of a right-padded row (the score)."""
    return jnp.take_along_axis(values, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]


class PairwiseOutput(NamedTuple):
    loss: Float[Array, " b"]  # per pair
    chosen_score: Float[Array, " b"]
    rejected_score: Float[Array, " b"]


def pairwise_loss(
    chosen_values: Float[Array, "b l"],
    rejected_values: Float[Array, "b l"],
    chosen: Int[Array, "b l"],
    rejected: Int[Array, "b l"],
    chosen_length: Int[Array, " b"],
    rejected_length: Int[Array, " b"],
) -> PairwiseOutput:
    """DeepSpeed-Chat's reward-model loss, per pair, over the span where the two answers differ.

    With `c_end`, `r_end` the lengths (index of the first padding slot), `div` the first index where
    the token sequences differ and `end = max(c_end, r_end)`:

        loss = mean_{t in [div, end)} -log sigmoid(v_chosen[t] - v_rejected[t])

    (the span may include the shorter row's padding, as in DeepSpeed-Chat). An identical pair uses
    the span `[l - 1, l)`. Scores are the values at the last real tokens, `v[c_end - 1]`, `v[r_end - 1]`.
    Two rows differ at `t` when their tokens differ or only one of them is still real there, so a pad
    id that equals a real id (EOS used as padding) cannot hide a difference.
    """
    width = chosen.shape[1]
    t = jnp.arange(width)[None, :]
    in_chosen, in_rejected = t < chosen_length[:, None], t < rejected_length[:, None]
    end = jnp.maximum(chosen_length, rejected_length)
    differs = ((chosen != rejected) | (in_chosen != in_rejected)) & (t < end[:, None])
    any_diff = jnp.any(differs, axis=1)
    div = jnp.where(any_diff, jnp.argmax(differs, axis=1), width - 1)
    end = jnp.where(any_diff, end, width)
    span = ((t >= div[:, None]) & (t < end[:, None])).astype(jnp.float32)
    per_token = -jax.nn.log_sigmoid(chosen_values.astype(jnp.float32) - rejected_values.astype(jnp.float32))
    loss = jnp.sum(per_token * span, axis=1) / jnp.sum(span, axis=1)
    return PairwiseOutput(loss, last_token_values(chosen_values, chosen_length),
                          last_token_values(rejected_values, rejected_length))


def kl_penalized_rewards(
    logprobs: Float[Array, "b a"],
    ref_logprobs: Float[Array, "b a"],
    score: Float[Array, " b"],
    mask: Float[Array, "b a"],
    kl_ctl: float = 0.1,
    clip_reward_value: float = 5.0,
) -> Float[Array, "b a"]:
    """Per-token rewards: a KL penalty on every answer token plus the clipped score on the last one.

        r_j = -kl_ctl * (logp_j - ref_logp_j)                 for j < n
        r_{n-1} += clip(score, -clip_reward_value, clip_reward_value)
        r_j = 0                                               for j >= n

    with `n = sum_j mask_j`. DeepSpeed-Chat adds the score at index `n` instead (one slot after the
    last answer token when answers are right-padded, DSE PR #672); jaxllm places it on the last
    answer token, where the reward model scored the answer.
    """
    mask = mask.astype(jnp.float32)
    length = jnp.sum(mask, axis=1).astype(jnp.int32)
    rewards = -kl_ctl * (logprobs - ref_logprobs) * mask
    last = jax.nn.one_hot(length - 1, logprobs.shape[1], dtype=jnp.float32)  # all zero when length == 0
    return rewards + last * jnp.clip(score, -clip_reward_value, clip_reward_value)[:, None]


def gae_advantages(
    rewards: Float[Array, "b a"],
    values: Float[Array, "b a"],
    mask: Float[Array, "b a"],
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Float[Array, "b a"], Float[Array, "b a"]]:
    """Generalised advantage estimates and returns, DeepSpeed-Chat's `get_advantages_and_returns`.

    Rewards and values past a row's end are zeroed first (DeepSpeed-Chat zeroes them from `ends` on),
    then for j = A-1 down to 0, with V_A = 0:

        delta_j = r_j + gamma * V_{j+1} - V_j
        A_j     = delta_j + gamma * lam * A_{j+1}
        R_j     = A_j + V_j

    No whitening. Returns (advantages, returns).
    """
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, delta):
        advantage = delta + gamma * lam * carry
        return advantage, advantage

    _, reversed_adv = jax.lax.scan(back, jnp.zeros_like(values[:, 0]), deltas.T[::-1])
    advantages = reversed_adv[::-1].T
    return advantages, advantages + values


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def policy_loss(
    logprobs: Float[Array, "b a"],
    old_logprobs: Float[Array, "b a"],
    advantages: Float[Array, "b a"],
    mask: Float[Array, "b a"],
    cliprange: float = 0.2,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """PPO's clipped surrogate, DeepSpeed-Chat's `actor_loss_fn`; also the fraction of clipped ratios.

        ratio = exp((logp - logp_old) * mask)
        L = sum(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) * mask) / sum(mask)
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp((logprobs - old_logprobs) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _masked_mean(jnp.maximum(unclipped, clipped), mask)
    clip_fraction = _masked_mean((jnp.abs(ratio - 1.0) > cliprange).astype(jnp.float32), mask)
    return loss, clip_fraction


def value_loss(
    values: Float[Array, "b a"],
    old_values: Float[Array, "b a"],
    returns: Float[Array, "b a"],
    mask: Float[Array, "b a"],
    cliprange_value: float = 0.2,
) -> Float[Array, ""]:
    """The critic's clipped squared error, DeepSpeed-Chat's `critic_loss_fn`.

        V_clip = clip(V, V_old - eps_v, V_old + eps_v)
        L = 0.5 * sum(max((V - R)^2, (V_clip - R)^2) * mask) / sum(mask)
    """
    mask = mask.astype(jnp.float32)
    clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    return 0.5 * _masked_mean(jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns)), mask)
