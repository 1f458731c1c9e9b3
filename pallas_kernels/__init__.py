"""Pallas kernels: alternative implementations of `jaxllm.ops`, each checked against its `jnp` reference."""
