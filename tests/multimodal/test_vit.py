"""The ViT encoder against Hugging Face CLIP (torch, CPU) on the same random weights."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from jaxllm.errors import UserError
from jaxllm.multimodal.config import VisionConfig
from jaxllm.multimodal.vit import ViT, load_clip_vision

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=24,
            patch_size=6, num_channels=3, layer_norm_eps=1e-5)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn (norm weights around 1), so any mix-up of tensors changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1.0 if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else noise)
    return model.eval()


def jax_model(cfg: VisionConfig, params) -> ViT:
    model = ViT(cfg, nnx.Rngs(params=0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, params))
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_encoder_matches_hugging_face_clip(tmp_path, act):
    torch.manual_seed(0)
    hf = randomize(CLIPVisionModel(CLIPVisionConfig(hidden_act=act, **TINY)), seed=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_clip_vision(tmp_path, VisionConfig())
    assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.layers, cfg.tokens) == (24, 6, 32, 2, 17)
    model = jax_model(cfg, params)
    pixels = np.random.default_rng(0).normal(size=(3, 3, 24, 24)).astype(np.float32)  # NCHW, as torch takes
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(pixels))
    ours = model(pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(ours), out.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(model.pooled(pixels.transpose(0, 2, 3, 1))), out.pooler_output.numpy(),
                               atol=1e-4, rtol=1e-4)


def test_vision_tower_of_a_full_clip_model_loads_and_drops_the_class_token(tmp_path):
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=16)
    hf = randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=8)), seed=2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_clip_vision(tmp_path, VisionConfig(keep_class_token=False))
    assert cfg.tokens == 16
    pixels = np.random.default_rng(1).normal(size=(2, 3, 24, 24)).astype(np.float32)
    with torch.no_grad():
        want = hf.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()[:, 1:]
    got = jax_model(cfg, params)(pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_bad_checkpoints_are_refused_with_the_tensor_or_file_named(tmp_path):
    hf = CLIPVisionModel(CLIPVisionConfig(**TINY))
    hf.save_pretrained(tmp_path / "ok", safe_serialization=True)
    tensors = load_file(tmp_path / "ok" / "model.safetensors")
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file({k: v for k, v in tensors.items() if not k.endswith("encoder.layers.1.mlp.fc2.weight")},
              tmp_path / "missing" / "model.safetensors")
    with pytest.raises(UserError, match="layers.1.mlp.fc2.weight' is missing"):
        load_clip_vision(tmp_path / "missing")
    (tmp_path / "shape").mkdir()
    config = json.loads((tmp_path / "ok" / "config.json").read_text()) | {"intermediate_size": 64}
    (tmp_path / "shape" / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "shape" / "model.safetensors")
    with pytest.raises(UserError, match=r"fc1.weight' .* has shape \[48, 32\], but 'config.json' implies \[64, 32\]"):
        load_clip_vision(tmp_path / "shape")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(UserError, match="pickle"):
        load_clip_vision(tmp_path / "pickle")
    with pytest.raises(UserError, match="not a directory"):
        load_clip_vision(tmp_path / "nowhere")
