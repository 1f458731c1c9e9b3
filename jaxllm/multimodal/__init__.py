"""DeepSpeed-VisualChat in JAX: a ViT image encoder, a projection and any jaxllm decoder, trained on
interleaved multi-image, multi-round conversations with multi-modal causal attention (MMCA).

    jaxllm.multimodal.mmca_attention(q, k, v, token_types)   # the attention (mmca.py)
    python -m jaxllm.multimodal.train --config=configs/visualchat/tiny.yaml
    python -m jaxllm.multimodal.chat --workdir runs/visualchat --image a.png --question "..."

Modules: `config` (the YAML schema), `vit` (CLIP-style encoder, Hugging Face CLIP loading),
`model` (projection, text-embedding copy, placeholder filling), `data` (conversations, template,
labels, concatenation, blending, images), `synthetic` (a coloured-shapes visual QA task), `train`,
`chat`. See docs/visualchat.md.
"""

from jaxllm.multimodal.mmca import mmca_attention, mmca_cached_override, mmca_override

__all__ = ["mmca_attention", "mmca_cached_override", "mmca_override"]
