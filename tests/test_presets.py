"""Model presets in configs/: architecture, parameter counts, meshes and an allocation-free dry run.

Each preset's parameter count is checked three ways: the count `--dry-run` prints, an independent
formula over the tensors of the matching Hugging Face checkpoint layout (written out here, not taken
from jaxllm), and the figure the model's publishers state where they state an exact one.
"""

from __future__ import annotations

import functools
import re
import resource
import subprocess

import jax
import pytest

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.errors import UserError
from jaxllm.train import train
from tests.conftest import PYTHON, REPO, subprocess_env

# Published architectures (the checkpoints' config.json values).
ARCH = {
    "gpt2_124m": dict(family="gpt2", layers=12, d_model=768, heads=12, kv_heads=12, ffn=3072, vocab=50257,
                      positions=1024, tied=True),
    "bloom_560m": dict(family="bloom", layers=24, d_model=1024, heads=16, kv_heads=16, ffn=4096, vocab=250880,
                       positions=2048, tied=True),
    "bloom_176b": dict(family="bloom", layers=70, d_model=14336, heads=112, kv_heads=112, ffn=57344,
                       vocab=250880, positions=2048, tied=True),
    "llmjp_13b": dict(family="gpt2", layers=40, d_model=5120, heads=40, kv_heads=40, ffn=20480, vocab=50688,
                      positions=2048, tied=True),
    "llama_1b": dict(family="llama", layers=22, d_model=2048, heads=32, kv_heads=4, ffn=5632, vocab=32000,
                     positions=2048, tied=False),
}

# Exact counts stated by the publishers (model cards / papers). LLM-jp-13B ("13b") and TinyLlama
# ("1.1B") state only rounded figures, checked below against the formula.
PUBLISHED = {"gpt2_124m": 124_439_808, "bloom_560m": 559_214_592, "bloom_176b": 176_247_271_424}
ROUNDED = {"llmjp_13b": 13e9, "llama_1b": 1.1e9}


def hf_param_count(family: str, layers: int, d_model: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                   positions: int, tied: bool) -> int:
    """Sum of the tensor sizes of a Hugging Face GPT2LMHeadModel / BloomForCausalLM / LlamaForCausalLM."""
    d, hd = d_model, d_model // heads
    if family == "llama":  # q, k, v, o without biases; gate, up, down; two RMSNorm scales
        attn = d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d
        block = attn + 3 * d * ffn + 2 * d
        embed, final_norm = vocab * d, d
    else:  # fused qkv (3d x d + 3d), dense (d x d + d), fc/proj with biases, two LayerNorms
        block = (3 * d * d + 3 * d) + (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
        embed = vocab * d + (positions * d if family == "gpt2" else 2 * d)  # wpe / BLOOM's embedding LayerNorm
        final_norm = 2 * d
    head = 0 if tied else vocab * d
    return embed + layers * block + final_norm + head


@functools.cache
def preset(name: str, *overrides: str) -> config_lib.Config:
    return config_lib.load(REPO / "configs" / f"{name}.yaml", list(overrides))


def _dry_run(name: str, tmp_path, capsys, *overrides: str) -> str:
    capsys.readouterr()
    train(preset(name, *overrides), tmp_path / name, dry=True)
    return capsys.readouterr().out


def _printed_count(out: str) -> int:
    match = re.search(r"^parameters: ([\d,]+) ", out, re.M)
    assert match, out
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize("name", sorted(ARCH))
def test_preset_matches_published_architecture(name):
    m, a = preset(name).model, ARCH[name]
    assert (m.family, m.layers, m.d_model, m.heads, m.num_kv_heads, m.ffn_dim, m.vocab_size, m.max_len, m.tied) == (
        a["family"], a["layers"], a["d_model"], a["heads"], a["kv_heads"], a["ffn"], a["vocab"], a["positions"],
        a["tied"])
    assert preset(name).data.seq_len == m.max_len


def test_formula_reproduces_published_counts():
    for name, count in PUBLISHED.items():
        assert hf_param_count(**ARCH[name]) == count, name
    for name, rounded in ROUNDED.items():
        assert abs(hf_param_count(**ARCH[name]) / rounded - 1) < 0.02, name
    assert hf_param_count(**ARCH["llmjp_13b"]) == 12_855_592_960
    assert hf_param_count(**ARCH["llama_1b"]) == 1_100_048_384


@pytest.mark.parametrize("name", sorted(ARCH))
def test_dry_run_prints_exact_count_without_allocating(name, tmp_path, capsys, devices):
    live_before = sum(a.nbytes for a in jax.live_arrays())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = _dry_run(name, tmp_path, capsys)
    assert _printed_count(out) == hf_param_count(**ARCH[name]) == PUBLISHED.get(name, hf_param_count(**ARCH[name]))
    assert sum(a.nbytes for a in jax.live_arrays()) - live_before < 2**20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 2 * 2**20  # < 2 GiB
    assert not (tmp_path / name).exists()  # a dry run writes nothing
    # The printed per-device weight bytes follow from the mesh: f32 weights / sharding factor.
    mesh = mesh_lib.resolve_axis_sizes(preset(name).mesh, len(devices))
    factor = mesh["tensor"] * (mesh["fsdp"] if preset(name).mesh.zero_stage == 3 else 1)
    params_gib = float(re.search(r"params ([\d.]+) GiB", out).group(1))
    assert params_gib == pytest.approx(4 * _printed_count(out) / factor / 2**30, rel=0.01)


def test_bloom_176b_is_tensor_parallel_and_fits_its_target_cluster():
    cfg = preset("bloom_176b")
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.remat == "full"
    assert mesh_lib.resolve_axis_sizes(cfg.mesh, 8) == {"stage": 1, "data": 1, "fsdp": 1, "tensor": 8, "sequence": 1}
    assert mesh_lib.resolve_axis_sizes(cfg.mesh, 256) == {"stage": 1, "data": 1, "fsdp": 32, "tensor": 8, "sequence": 1}
    # 16 bytes per parameter (f32 weights, gradients, two Adam moments) over 256 devices: under 11 GiB each.
    assert 16 * 176_247_271_424 / 256 < 11 * 2**30
    micro = cfg.train.batch_size // cfg.train.grad_accum
    assert micro % 32 == 0  # the micro-batch splits over the 32 fsdp shards
    with pytest.raises(UserError, match="mesh"):
        mesh_lib.resolve_axis_sizes(cfg.mesh, 1)


@pytest.mark.parametrize("name", ["gpt2_124m", "bloom_560m", "llama_1b", "llmjp_13b"])
def test_fsdp_presets_run_on_one_or_eight_devices(name):
    cfg = preset(name)
    for count in (1, 8):
        sizes = mesh_lib.resolve_axis_sizes(cfg.mesh, count)
        assert sizes == {"stage": 1, "data": 1, "fsdp": count, "tensor": 1, "sequence": 1}
        assert (cfg.train.batch_size // cfg.train.grad_accum) % count == 0
    # bf16 matmuls everywhere; every preset from 560M up recomputes activations in the backward pass.
    assert cfg.model.compute_dtype == "bfloat16"
    assert (cfg.model.remat != "none") == (hf_param_count(**ARCH[name]) > 500e6)


def test_cli_dry_run_on_one_device():
    result = subprocess.run(
        [PYTHON, "-m", "jaxllm.train", "--config", str(REPO / "configs" / "gpt2_124m.yaml"), "--dry-run"],
        env=subprocess_env(devices=1), capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "parameters: 124,439,808 " in result.stdout
    assert "'fsdp': 1" in result.stdout


def test_every_recipe_is_its_preset_on_all_of_its_targets_devices():
    """configs/recipes/ (compiled by scripts/aot_table.py, minutes each): each file changes its preset's
    mesh and batch, and at most how the same model runs (rematerialisation, scanned layers), and its
    mesh covers exactly the devices of the target it is written for."""
    import dataclasses
    import math
    import runpy

    recipes = runpy.run_path(str(REPO / "scripts" / "aot_table.py"))["RECIPES"]
    shipped = {f"configs/recipes/{p.name}" for p in (REPO / "configs" / "recipes").glob("*.yaml")}
    assert {path for path, _, _ in recipes.values()} == shipped
    for path, target, overrides in recipes.values():
        config = config_lib.load(REPO / path, overrides)
        preset = config_lib.load(REPO / "configs" / f"{path.split('/')[-1].split('.')[0]}.yaml")
        runs_as_preset = dataclasses.replace(config.model, remat=preset.model.remat,
                                             scan_layers=preset.model.scan_layers)
        assert runs_as_preset == preset.model and config.data == preset.data, path
        devices = math.prod(int(n) for n in target.split(":")[-1].split("x"))  # chips, or nodes x GPUs
        axes = [config.mesh.stage, config.mesh.fsdp, config.mesh.tensor, config.mesh.sequence]
        data = config.mesh.data if config.mesh.data != -1 else devices // math.prod(axes)
        assert data * math.prod(axes) == devices, (path, target)
        rows_per_step = config.train.batch_size // config.train.grad_accum
        assert rows_per_step * config.train.grad_accum == config.train.batch_size, path
        # With stages each loss call's rows are cut into pipeline micro-batches, each split over the
        # data-parallel devices.
        micro = config.mesh.microbatches() if config.mesh.stage > 1 else 1
        assert rows_per_step % (micro * data * config.mesh.fsdp) == 0, path
        config.mesh.check_pipeline(config.model.layers)
