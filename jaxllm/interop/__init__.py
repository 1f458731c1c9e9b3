"""Checkpoints from and to other ecosystems.

`jaxllm.interop.hf` loads and saves Hugging Face GPT-2, Llama and BLOOM directories (safetensors
only); `python -m jaxllm.interop.convert` converts between them and jaxllm training checkpoints.
"""
