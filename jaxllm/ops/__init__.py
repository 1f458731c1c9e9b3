"""Numerical ops: each has a plain `jnp` reference that defines it and is the CPU path."""

from jaxllm.ops.attention import causal_attention, causal_attention_reference
from jaxllm.ops.evoformer import evoformer_attention, evoformer_attention_reference
from jaxllm.ops.matmul import matmul

__all__ = ["causal_attention", "causal_attention_reference", "evoformer_attention", "evoformer_attention_reference",
           "matmul"]
