"""Random Evoformer attention inputs and a jitted value-and-VJP, shared by the XLA and Pallas tests."""

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(seed, shape, bias_shapes, dtype=jnp.float32, lk=None, mask_index=None):
    """q, k, v, biases, cotangent. `mask_index`: the bias that is a 0/-1e9 key mask (others normal)."""
    rng = np.random.default_rng(seed)
    b, n, lq, h, d = shape
    kshape = (b, n, lk or lq, h, d)
    q = jnp.asarray(rng.normal(size=shape), dtype)
    k, v = (jnp.asarray(rng.normal(size=kshape), dtype) for _ in range(2))
    biases = []
    for i, s in enumerate(bias_shapes):
        if i == mask_index:
            biases.append(jnp.asarray(1e9 * ((rng.random(s) < 0.8) - 1.0), dtype))
        else:
            biases.append(jnp.asarray(rng.normal(size=s), dtype))
    return q, k, v, biases, jnp.asarray(rng.normal(size=shape), dtype)


def value_and_grads(fn, q, k, v, biases, cotangent):
    """[out, dq, dk, dv, dbias...] of `fn` for a given output cotangent, in one jitted call."""

    @jax.jit
    def run(q, k, v, biases, cotangent):
        out, vjp = jax.vjp(fn, q, k, v, biases)
        dq, dk, dv, dbs = vjp(cotangent)
        return [out, dq, dk, dv, *dbs]

    return run(q, k, v, list(biases), cotangent)
