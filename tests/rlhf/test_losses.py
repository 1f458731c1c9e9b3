"""The RLHF objectives against worked examples (numbers derived by hand from the formulas) and against
plain-Python transcriptions of DeepSpeed-Chat's loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.rlhf.losses import (
    gae_advantages,
    kl_penalized_rewards,
    last_token_values,
    pairwise_loss,
    policy_loss,
    token_logprobs,
    value_loss,
)


def softplus_neg(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------- pairwise


def test_pairwise_loss_worked_example_divergent_span():
    # chosen "5 6 7 8 EOS" (length 5), rejected "5 6 9 EOS" (length 4): they first differ at t = 2, and
    # end = max(5, 4) = 5, so the span is t = 2, 3, 4 (t = 4 is the rejected row's padding).
    chosen = jnp.array([[5, 6, 7, 8, 3, 0]])
    rejected = jnp.array([[5, 6, 9, 3, 0, 0]])
    cv = jnp.array([[9.0, 9.0, 1.0, 2.0, 0.5, 9.0]])  # 9s lie outside the span and must not count
    rv = jnp.array([[-9.0, -9.0, 0.0, 1.0, -0.5, -9.0]])
    out = pairwise_loss(cv, rv, chosen, rejected, jnp.array([5]), jnp.array([4]))
    # every difference in the span is 1: loss = -log sigmoid(1) = log(1 + e^-1)
    assert float(out.loss[0]) == pytest.approx(0.31326168751822286, rel=1e-6)
    assert float(out.chosen_score[0]) == 0.5  # value at chosen's last real token, index 4
    assert float(out.rejected_score[0]) == 1.0  # rejected's, index 3


def test_pairwise_loss_identical_pair_uses_the_last_slot():
    tokens = jnp.array([[5, 6, 3, 0, 0, 0]])
    cv = jnp.array([[4.0, 4.0, 4.0, 4.0, 4.0, 2.0]])
    rv = jnp.zeros((1, 6))
    out = pairwise_loss(cv, rv, tokens, tokens, jnp.array([3]), jnp.array([3]))
    assert float(out.loss[0]) == pytest.approx(softplus_neg(2.0), rel=1e-6)  # span [5, 6)
    assert float(out.chosen_score[0]) == 4.0


def test_pairwise_loss_sees_a_length_difference_when_padding_equals_eos():
    # EOS (3) used as padding: the tokens agree everywhere, but chosen ends at 2 and rejected at 3.
    tokens = jnp.array([[5, 3, 3, 3]])
    cv = jnp.array([[0.0, 0.0, 2.0, 9.0]])
    rv = jnp.array([[0.0, 0.0, 1.0, 9.0]])
    out = pairwise_loss(cv, rv, tokens, tokens, jnp.array([2]), jnp.array([3]))
    assert float(out.loss[0]) == pytest.approx(softplus_neg(1.0), rel=1e-6)  # span [2, 3)


def deepspeed_pairwise(cv, rv, chosen, rejected, pad):
    """DeepSpeed-Chat's RewardModel.forward loss (num_padding_at_beginning = 0), transcribed."""
    losses, c_scores, r_scores = [], [], []
    length = chosen.shape[1]
    for i in range(chosen.shape[0]):
        c_inds = np.nonzero(chosen[i] == pad)[0]
        c_ind = c_inds[0] if len(c_inds) else length
        diverge = np.nonzero(chosen[i] != rejected[i])[0]
        if len(diverge) == 0:
            end, div, r_ind = length, length - 1, c_ind
        else:
            r_inds = np.nonzero(rejected[i] == pad)[0]
            r_ind = r_inds[0] if len(r_inds) else length
            end, div = max(c_ind, r_ind), diverge[0]
        d = cv[i, div:end] - rv[i, div:end]
        losses.append(np.mean(np.log1p(np.exp(-d))))
        c_scores.append(cv[i, c_ind - 1])
        r_scores.append(rv[i, r_ind - 1])
    return np.array(losses), np.array(c_scores), np.array(r_scores)


def test_pairwise_loss_equals_deepspeed_on_random_pairs():
    rng = np.random.default_rng(0)
    batch, width, pad = 16, 12, 0
    prompt = rng.integers(4, 20, size=4)
    chosen = np.full((batch, width), pad)
    rejected = np.full((batch, width), pad)
    c_len, r_len = np.zeros(batch, int), np.zeros(batch, int)
    for i in range(batch):
        for arr, lens in ((chosen, c_len), (rejected, r_len)):
            answer = rng.integers(4, 7, size=rng.integers(1, width - 4 + 1))  # few ids: shared prefixes happen
            row = np.concatenate([prompt, answer])[:width]
            arr[i, :len(row)], lens[i] = row, len(row)
    rejected[3], r_len[3] = chosen[3], c_len[3]  # one identical pair
    cv, rv = rng.normal(size=(batch, width)), rng.normal(size=(batch, width))
    out = pairwise_loss(jnp.asarray(cv, jnp.float32), jnp.asarray(rv, jnp.float32), jnp.asarray(chosen),
                        jnp.asarray(rejected), jnp.asarray(c_len), jnp.asarray(r_len))
    want = deepspeed_pairwise(cv, rv, chosen, rejected, pad)
    np.testing.assert_allclose(out.loss, want[0], rtol=1e-5)
    np.testing.assert_allclose(out.chosen_score, want[1], rtol=1e-6)
    np.testing.assert_allclose(out.rejected_score, want[2], rtol=1e-6)


# ----------------------------------------------------------------------------------------- rewards


def test_kl_penalized_rewards_worked_example():
    logp = jnp.array([[-1.0, -2.0, -0.5, -7.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, -1.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    score = jnp.array([7.0, -2.0])
    r = kl_penalized_rewards(logp, ref, score, mask, kl_ctl=0.1, clip_reward_value=5.0)
    # row 0: -0.1 * (logp - ref) = [-0.05, 0.1, 0, (masked)]; score 7 clipped to 5 on the last answer
    # token (index 2), not one slot later as DeepSpeed-Chat's right-padded code does.
    # row 1: one answer token: -0.1 * 1 + (-2).
    np.testing.assert_allclose(r, [[-0.05, 0.1, 5.0, 0.0], [-2.1, 0.0, 0.0, 0.0]], rtol=1e-6, atol=1e-7)


def test_kl_penalized_rewards_of_an_empty_row_are_zero():
    r = kl_penalized_rewards(jnp.ones((1, 3)), jnp.zeros((1, 3)), jnp.array([3.0]), jnp.zeros((1, 3)))
    np.testing.assert_array_equal(r, np.zeros((1, 3)))


# ----------------------------------------------------------------------------------------- GAE


def test_gae_worked_example():
    rewards = jnp.array([[1.0, 0.0, 2.0, 4.0]])
    values = jnp.array([[0.5, 1.0, 1.5, 3.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the last slot is past the answer: zeroed
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 2 + 0 - 1.5 = 0.5, A = 0.5
    # t=1: delta = 0 + 1.5 - 1.0 = 0.5, A = 0.5 + 0.95 * 0.5 = 0.975
    # t=0: delta = 1 + 1.0 - 0.5 = 1.5, A = 1.5 + 0.95 * 0.975 = 2.42625
    np.testing.assert_allclose(adv, [[2.42625, 0.975, 0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[2.92625, 1.975, 2.0, 0.0]], rtol=1e-6)


def deepspeed_gae(values, rewards, start, gamma, lam):
    """DeepSpeed-Chat's get_advantages_and_returns, transcribed (values and rewards already zeroed)."""
    last = 0.0
    out = []
    length = rewards.shape[-1]
    for t in reversed(range(start, length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = np.stack(out[::-1], axis=1)
    return adv, adv + values[:, start:]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_equals_deepspeed_loop_with_masks(gamma, lam):
    rng = np.random.default_rng(1)
    batch, answer = 5, 7
    lengths = np.array([7, 1, 4, 0, 3])
    mask = (np.arange(answer)[None] < lengths[:, None]).astype(np.float32)
    rewards, values = rng.normal(size=(batch, answer)), rng.normal(size=(batch, answer))
    adv, ret = gae_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                              jnp.asarray(mask), gamma, lam)
    want_adv, want_ret = deepspeed_gae(values * mask, rewards * mask, 0, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- PPO losses


def test_policy_loss_worked_example():
    adv = jnp.array([[2.0, -1.0, 1.0, 7.0]])
    old = jnp.zeros((1, 4))
    new = jnp.log(jnp.array([[1.5, 1.5, 1.1, 9.0]]))
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped = policy_loss(new, old, adv, mask, cliprange=0.2)
    # ratio 1.5, A = 2:  max(-3.0, -2.4) = -2.4   (clipped: no credit past 1.2)
    # ratio 1.5, A = -1: max( 1.5,  1.2) =  1.5   (the pessimistic, unclipped term)
    # ratio 1.1, A = 1:  max(-1.1, -1.1) = -1.1
    # masked slot: log-ratio 0, weight 0.  Mean over 3 tokens: -2 / 3.
    assert float(loss) == pytest.approx(-2.0 / 3.0, rel=1e-6)
    assert float(clipped) == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_value_loss_worked_example():
    old = jnp.ones((1, 4))
    values = jnp.array([[1.5, 0.9, 2.0, 50.0]])
    returns = jnp.array([[2.0, 0.0, 1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # clipped values [1.2, 0.9, 1.2]; max of squared errors: [0.64, 0.81, 1.0]; 0.5 * 2.45 / 3
    assert float(loss) == pytest.approx(0.5 * 2.45 / 3.0, rel=1e-6)


def test_policy_loss_gradient_vanishes_outside_the_trust_region():
    adv = jnp.array([[1.0, 1.0]])
    old = jnp.zeros((1, 2))
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, jnp.ones((1, 2)))[0])(jnp.log(jnp.array([[1.5, 1.0]])))
    # ratio 1.5 > 1.2 with a positive advantage: clipped, no gradient; ratio 1: d(-A r)/d logp = -A r / n = -0.5
    np.testing.assert_allclose(grad, [[0.0, -0.5]], atol=1e-7)


def test_token_logprobs_and_last_token_values():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    tokens = jnp.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
    got = token_logprobs(logits, tokens)
    want = np.array([[jax.nn.log_softmax(logits[b, t])[tokens[b, t + 1]] for t in range(4)] for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    values = jnp.arange(10.0).reshape(2, 5)
    np.testing.assert_array_equal(last_token_values(values, jnp.array([3, 5])), [2.0, 9.0])
