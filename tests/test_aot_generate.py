"""`python -m jaxllm.aot --step=generate`: a tiny model's generation programs (prefill + KV-cache decode
loop, and one decode step) through the real XLA TPU and GPU compilers, dense and W8A8; the KV cache and
parameter bytes against their formulas, the W8A8 program's products against their element types, and
a generation that cannot fit refused with exit status 3."""

import json
import subprocess

import pytest

from jaxllm import config as config_lib
from jaxllm.aot import Target, hlo
from jaxllm.aot.__main__ import main as aot_main
from jaxllm.aot.generate import W8A8_GROUPS, compile_generate_step
from jaxllm.errors import UserError
from jaxllm.models.decoder import count_params
from tests.conftest import PYTHON, REPO, subprocess_env

pytest.importorskip("libtpu", reason="the TPU compiler comes with the aot extra: pip install -e '.[aot]'")

# Head dim and cache length of 128, so that the TPU's (8, 128) tiles pad no cache bytes; the head [512, 1024]
# is shaped like no quantized matrix.
LLAMA = ["model.family=llama", "model.layers=1", "model.d_model=512", "model.heads=4", "model.kv_heads=4",
         "model.d_ff=512", "model.vocab_size=1024", "model.max_len=128", "model.compute_dtype=bfloat16"]
CACHE_BYTES = 1 * 2 * 8 * 128 * 4 * 128 * 2 // 4  # layers x (k, v) x batch x slots x kv heads x head dim x bf16 / 4
SIZES = dict(batch=8, prompt_len=32, max_new_tokens=96)  # a cache of 128 slots


def _needs(target: str):
    if target.startswith("gpu"):
        pytest.importorskip("jax_cuda12_plugin", reason="the GPU compiler: pip install -e '.[aot-gpu]'")


def w8a8_parameter_bytes(cfg) -> int:
    """Bytes of the W8A8 tree, replicated: int8 block matmuls with 64 f32 scales each, the int8 embedding
    with one f32 scale per row, the f32 head and norms."""
    d, f, vocab = cfg.d_model, cfg.d_ff, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    matrices = [d * d, d * kv, d * kv, d * d, d * f, d * f, f * d]  # wq wk wv wo w_in w_gate w_out
    matmul_bytes = cfg.layers * sum(n + 4 * W8A8_GROUPS for n in matrices)
    rest = count_params(cfg)["total"] - cfg.layers * sum(matrices) - 2 * vocab * d  # the norms
    return matmul_bytes + vocab * d + 4 * vocab + 4 * d * vocab + 4 * rest


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "w8a8"])
@pytest.mark.parametrize("target", ["tpu:v5e:2x2", "gpu:h100:1x4"])
def test_tiny_generation_compiles_with_the_kv_cache_of_its_formula(target, quantize):
    _needs(target)
    config = config_lib.load(None, LLAMA)
    cfg = config.model
    report = compile_generate_step(config, Target.parse(target), quantize=quantize, **SIZES)
    assert report.fits and report.devices == 4 and report.mesh == {"tensor": 4} and report.cache_len == 128
    assert report.kv_cache == CACHE_BYTES  # the kv heads split over tensor 4
    if quantize == "none":  # f32, sharded over tensor 4 (the norms replicated)
        assert report.parameters == pytest.approx(count_params(cfg)["total"] * 4 / 4, rel=0.05)
    else:
        assert report.parameters == w8a8_parameter_bytes(cfg)
    step, program = report.decode_step, report.generate
    # Both programs take the parameters (padded alike to the compiler's tiles); the step also takes the
    # cache, and the generation program, which builds its cache inside, the prompts: besides a few small
    # integer arrays, their arguments differ by the cache.
    assert report.parameters <= program.arguments
    assert abs(step.arguments - program.arguments - report.kv_cache) <= 16 * 1024
    assert step.aliased >= report.kv_cache  # the donated cache is updated in place
    ratio = step.compiled_flops / report.model_flops_step
    # Replicated W8A8 weights leave part of the step replicated over the tensor axis (see docs/aot_generate.md).
    assert 0.9 < ratio < (1.5 if quantize == "none" else 3.0)
    if quantize == "w8a8" and target.startswith("tpu"):
        # Prefill and loop body each run the block's 7 matmuls as int8 x int8 -> int32, none on floats.
        assert report.integer_products >= 2 * 7 and report.dequantized_products == 0


@pytest.mark.slow
def test_a_tied_head_reads_the_int8_embedding_dequantized_and_the_check_sees_it():
    """GPT-2 ties its head to the int8 embedding, which has no quantized input: x @ embed^T runs on the
    dequantized table, in the prefill and in the loop body, and only there."""
    config = config_lib.load(None, [o for o in LLAMA if not o.startswith(("model.family", "model.kv_heads"))])
    report = compile_generate_step(config, Target.parse("tpu:v5e:2x2"), quantize="w8a8", **SIZES)
    assert report.dequantized_products == 2 and report.integer_products >= 2 * 4


def test_products_read_their_operand_types_from_the_hlo_text():
    text = """
  %param_0.1 = s8[256,512]{1,0:T(8,128)(4,1)} parameter(0)
  %fusion.2 = s8[8,256]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.2
  %convolution.3 = s32[8,512]{1,0:T(8,128)} convolution(%fusion.2, %param_0.1), dim_labels=bf_io->bf
  %w = f32[512,256]{1,0} convert(%param_0.1)
  %x = f32[8,512]{1,0} parameter(1)
  %dot.1 = f32[8,256]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %gemm = (f32[8,256]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm"
"""
    found = hlo.products(text)
    assert [p.integer for p in found] == [True, False, False]
    assert found[0].lhs == ("s8", (8, 256)) and found[1].rhs == ("f32", (512, 256)) and found[2].result == "f32"
    views = hlo.weight_views([(256, 512)], shards=4)
    assert views == {(256, 512), (128, 256), (64, 512)}
    assert hlo.dequantized_products(found, views) == found[1:]


def test_bad_generation_sizes_are_named():
    config = config_lib.load(None, LLAMA)
    with pytest.raises(UserError, match=r"--prompt-len 100 \+ --max-new-tokens 29 = 129 tokens exceed model.max_len"):
        compile_generate_step(config, Target.parse("tpu:v5e:2x2"), prompt_len=100, max_new_tokens=29)
    with pytest.raises(UserError, match="--batch 0"):
        compile_generate_step(config, Target.parse("tpu:v5e:2x2"), batch=0)
    with pytest.raises(UserError, match="--quantize 'w4'"):
        compile_generate_step(config, Target.parse("tpu:v5e:2x2"), quantize="w4")


def _aot(*args, tmp_path):
    out = tmp_path / "report.json"
    cmd = [PYTHON, "-m", "jaxllm.aot", "--target=tpu:v5e:2x2", f"--json={out}", *args]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    return result, out


@pytest.mark.slow
def test_cli_compiles_w8a8_generation_as_a_user_types_it(tmp_path):
    result, out = _aot("--step=generate", "--quantize=w8a8", "--batch", "8", "--prompt-len", "32",
                       "--max-new-tokens", "96", *LLAMA, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KV cache of 128 slots" in result.stdout and "fits" in result.stdout
    report = json.loads(out.read_text())
    assert report["quantize"] == "w8a8" and report["fits"] and report["kv_cache"] == CACHE_BYTES
    assert f"{report['integer_products']} int8 x int8 -> int32" in result.stdout
    assert report["dequantized_products"] == 0


@pytest.mark.slow
def test_cli_exits_3_when_the_cache_does_not_fit(tmp_path):
    # 40,000 rows x 1,024 slots x 512 bytes per slot and device (k and v, one 128-wide bf16 head each):
    # 19.5 GiB of cache on a 16 GiB chip.
    sizes = [o for o in LLAMA if not o.startswith("model.max_len")] + ["model.max_len=1024"]
    result, out = _aot("--step=generate", "--batch=40000", "--prompt-len=16", "--max-new-tokens=1008", *sizes,
                       tmp_path=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "to fit: fewer rows (--batch)" in result.stdout
    report = json.loads(out.read_text())
    assert not report["fits"] and report["kv_cache"] == 40000 * 1024 * 512 and report["total"] > 16 * 2**30


def test_generation_flags_are_refused_for_the_train_step(capsys):
    assert aot_main(["--target=tpu:v5e:2x2", "--batch=8"]) == 2
    assert "--batch applies to --step=generate" in capsys.readouterr().err


@pytest.mark.slow
def test_the_configs_compression_section_packed_int4_mlp_also_multiplies_integers(tmp_path):
    """`--quantize=config` plans the config's rules as `python -m jaxllm.compress ptq` does: int8 attention
    and packed int4 MLP weights, both with int8 token-wise inputs, unpack to int8 and multiply integers."""
    recipe = tmp_path / "w48a8.yaml"
    recipe.write_text("compression:\n  rules:\n"
                      "    attention: {modules: ['attn\\.w[qkvo]$'], weight_bits: 8, weight_groups: 64, act_bits: 8}\n"
                      "    mlp: {modules: ['mlp\\.w_'], weight_bits: 4, weight_groups: 64, act_bits: 8}\n")
    config = config_lib.load(recipe, LLAMA)
    report = compile_generate_step(config, Target.parse("tpu:v5e:2x2"), quantize="config", **SIZES)
    assert report.fits and report.integer_products >= 2 * 7 and report.dequantized_products == 0
    w8a8 = w8a8_parameter_bytes(config.model)
    cfg = config.model
    mlp = 3 * cfg.d_model * cfg.d_ff  # the same tree with the MLP's codes at half a byte and no int8 embedding
    assert report.parameters == w8a8 - mlp // 2 + 3 * cfg.vocab_size * cfg.d_model - 4 * cfg.vocab_size
