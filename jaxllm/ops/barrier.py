"""`gradient_barrier`: identity forward; on CPU the backward pass materialises the cotangent here.

XLA fuses elementwise producers into each of their consumers, duplicating them. In a decoder's backward
pass the residual stream's gradient is a sum of every later layer's norm-backward terms; left to the
fusion pass, each layer's weight-gradient operand (a transposed copy of that gradient) recomputed the
whole chain through every later layer, from up to 100 inputs read in transposed order. On the reference
GPT-2 (6 layers, d=512, f32, 2 CPU cores) those fusions took 1.4 of the step's 3.0 s; with a barrier at
each block boundary the step takes 2.4 s (`python scripts/profile_step.py`, docs/performance.md).

XLA:CPU removes optimisation barriers before fusion and turns small conditionals into selects, so the
barrier is a while loop whose trip count (always 1) is a runtime value: XLA must materialise its carry.
GPU and TPU fusion does not duplicate such chains, and a while loop there costs a host round trip per
iteration (and the compiler's time for one more loop per layer), so a program compiled for those
platforms gets the plain identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def gradient_barrier(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Returns `x`. In a program compiled for a CPU its gradient is materialised at this point (values
    unchanged). The platform is the compiled program's, not the local backend's: a step traced on a CPU
    host for a TPU or GPU target (`jaxllm.aot`) gets the plain identity, as it would on the device."""
    return jax.lax.platform_dependent(x, cpu=_cpu_barrier, default=lambda x: x)


@jax.custom_vjp
def _cpu_barrier(x):
    return x


def _forward(x):
    return x, None


def _backward(_, g):
    trips = 1 + jnp.isnan(g[(0,) * g.ndim]).astype(jnp.int32)  # 1, but not a compile-time constant
    # Adding 0 * trip (not foldable for floats) keeps the carry from being loop-invariant to JAX and XLA.
    body = lambda c: (c[0] + 1, c[1] + jnp.zeros([], c[1].dtype) * c[0].astype(c[1].dtype))  # noqa: E731
    _, g = jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), g))
    return (g,)


_cpu_barrier.defvjp(_forward, _backward)
