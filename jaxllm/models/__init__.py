"""Flax NNX model definitions."""

from jaxllm.models.decoder import Decoder, count_params

__all__ = ["Decoder", "count_params"]
