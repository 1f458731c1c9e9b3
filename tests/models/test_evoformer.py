"""Evoformer modules against the supplement's formulas written out with einsum, and a training check."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.models.evoformer import (
    ContactPredictor,
    MSAColumnAttention,
    MSARowAttentionWithPairBias,
    TriangleAttention,
)

B, S, R, CM, CZ, HEADS, C = 2, 3, 6, 8, 6, 2, 4
HP = jax.lax.Precision.HIGHEST


def w(linear):
    return linear.kernel[...]


def heads(x, linear):
    """x [..., c] @ kernel -> [..., H, C]."""
    return jnp.einsum("...c,cf->...f", x, w(linear), precision=HP).reshape(*x.shape[:-1], HEADS, C)


def gated_output(att, x, o):
    """Linear(sigmoid(x W_g + b_g) * o), o [..., H, C]."""
    g = jax.nn.sigmoid(jnp.einsum("...c,cf->...f", x, w(att.gate), precision=HP) + att.gate.bias[...])
    flat = g * o.reshape(*o.shape[:-2], -1)
    return jnp.einsum("...f,fc->...c", flat, w(att.output), precision=HP) + att.output.bias[...]


def softmax_last(logits):
    return jax.nn.softmax(logits, axis=-1)


def masked(mask):
    return 1e9 * (mask - 1.0)


def data(seed):
    rng = np.random.default_rng(seed)
    m = jnp.asarray(rng.normal(size=(B, S, R, CM)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(B, R, R, CZ)), jnp.float32)
    msa_mask = jnp.asarray(rng.random((B, S, R)) < 0.75, jnp.float32).at[:, :, 0].set(1.0).at[:, 0, :].set(1.0)
    pair_mask = jnp.asarray(rng.random((B, R, R)) < 0.75, jnp.float32)
    pair_mask = pair_mask.at[:, :, 0].set(1.0).at[:, 0, :].set(1.0)  # every row and column sees a key
    return m, z, msa_mask, pair_mask


def randomise(module, seed):
    """Replace every parameter by N(0, 0.5^2) so that no zero/one initialiser hides a wiring mistake."""
    graphdef, params = nnx.split(module)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.5 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def row_attention(mod, m, z, msa_mask, _):
    """(module output, Algorithm 7 written out)."""
    att = mod.attention
    x = mod.norm_m(m)
    q, k, v = heads(x, att.query), heads(x, att.key), heads(x, att.value)  # [B, S, R, H, C]
    pair = jnp.einsum("bijc,ch->bhij", mod.norm_z(z), w(mod.pair_bias), precision=HP)
    logits = (jnp.einsum("bsihc,bsjhc->bshij", q, k, precision=HP) / np.sqrt(C) + pair[:, None]
              + masked(msa_mask)[:, :, None, None, :])
    o = jnp.einsum("bshij,bsjhc->bsihc", softmax_last(logits), v, precision=HP)
    return mod(m, z, msa_mask), gated_output(att, x, o)


def column_attention(mod, m, _, msa_mask, __):
    """(module output, Algorithm 8 written out)."""
    att = mod.attention
    x = mod.norm(m)
    q, k, v = heads(x, att.query), heads(x, att.key), heads(x, att.value)  # [B, S, R, H, C]
    logits = (jnp.einsum("bsihc,btihc->bihst", q, k, precision=HP) / np.sqrt(C)
              + masked(msa_mask).transpose(0, 2, 1)[:, :, None, None, :])
    o = jnp.einsum("bihst,btihc->bsihc", softmax_last(logits), v, precision=HP)
    return mod(m, msa_mask), gated_output(att, x, o)


@pytest.mark.parametrize("algorithm", [7, 8])
def test_msa_attention_is_the_supplements_algorithm(algorithm):
    """Algorithm 7 (MSA row attention with pair bias) and 8 (MSA column attention) of the AlphaFold 2
    supplement, each against its written-out form."""
    build, reference, param_seed, data_seed = {
        7: (lambda: MSARowAttentionWithPairBias(CM, CZ, HEADS, C, rngs=nnx.Rngs(0)), row_attention, 1, 0),
        8: (lambda: MSAColumnAttention(CM, HEADS, C, rngs=nnx.Rngs(0)), column_attention, 2, 1),
    }[algorithm]
    mod = randomise(build(), param_seed)
    got, want = jax.jit(lambda args: reference(mod, *args))(data(data_seed))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_triangle_attention_starting_and_ending_node_are_algorithms_13_and_14():
    _, z, _, pair_mask = data(2)
    for starting, seed in ((True, 3), (False, 4)):
        mod = randomise(TriangleAttention(CZ, HEADS, C, starting=starting, rngs=nnx.Rngs(0)), seed)
        got, want = jax.jit(lambda z, mask, mod=mod: triangle_attention(mod, z, mask))(z, pair_mask)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"starting={mod.starting}")


def triangle_attention(mod, z, pair_mask):
    """(module output, Algorithm 13 or 14 written out)."""
    att = mod.attention
    x = mod.norm(z)
    q, k, v = heads(x, att.query), heads(x, att.key), heads(x, att.value)  # [B, R, R, H, C] at (i, j)
    bias = jnp.einsum("bxyc,ch->bhxy", x, w(mod.triangle_bias), precision=HP)  # b_xy per head
    if mod.starting:  # softmax_k(q_ij . k_ik / sqrt(c) + b_jk), masked by pair_mask[i, k]; sum_k a v_ik
        logits = (jnp.einsum("bijhc,bikhc->bhijk", q, k, precision=HP) / np.sqrt(C) + bias[:, :, None]
                  + masked(pair_mask)[:, None, :, None, :])
        o = jnp.einsum("bhijk,bikhc->bijhc", softmax_last(logits), v, precision=HP)
    else:  # softmax_k(q_ij . k_kj / sqrt(c) + b_ki), masked by pair_mask[k, j]; sum_k a v_kj
        logits = (jnp.einsum("bijhc,bkjhc->bhijk", q, k, precision=HP) / np.sqrt(C)
                  + bias.transpose(0, 1, 3, 2)[:, :, :, None, :]
                  + masked(pair_mask).transpose(0, 2, 1)[:, None, None, :, :])
        o = jnp.einsum("bhijk,bkjhc->bijhc", softmax_last(logits), v, precision=HP)
    return mod(z, pair_mask), gated_output(att, x, o)


VOCAB, SEQS, LENGTH, BATCH = 5, 4, 10, 4


def synthetic_batch(key):
    """Query sequence plus mutated copies; target: do residues i and j of the query carry the same token?"""
    k1, k2, k3 = jax.random.split(key, 3)
    query = jax.random.randint(k1, (BATCH, LENGTH), 0, VOCAB)
    mutate = jax.random.bernoulli(k2, 0.2, (BATCH, SEQS, LENGTH)).at[:, 0].set(False)
    msa = jnp.where(mutate, jax.random.randint(k3, (BATCH, SEQS, LENGTH), 0, VOCAB), query[:, None])
    target = (query[:, :, None] == query[:, None, :]).astype(jnp.float32)
    return msa, jnp.ones((BATCH, SEQS, LENGTH)), target


@pytest.mark.slow
def test_evoformer_stack_learns_synthetic_task():
    model = ContactPredictor(VOCAB, blocks=2, c_m=16, c_z=16, heads=2, head_dim=8, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)

    def loss_fn(params, msa, mask, target):
        logits = nnx.merge(graphdef, params)(msa, mask)
        return optax.sigmoid_binary_cross_entropy(logits, target).mean()

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, *synthetic_batch(key))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    params, opt_state, first = step(params, opt_state, jax.random.key(0))  # compiles
    start = time.perf_counter()
    losses = [float(first)]
    for i in range(1, 40):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    train_s = time.perf_counter() - start
    # Chance level for this target is about 0.5 nats; the stack must get well below its first loss.
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
    assert train_s < 30, train_s
