"""jaxllm: DeepSpeed's training, compression and RLHF ideas, native to JAX/XLA."""

__version__ = "0.1.0"
