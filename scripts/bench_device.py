"""Accelerator checks for scripts/device_check.sh: matmul peak, a 1B Llama bf16 train step, Pallas vs XLA.

    python scripts/bench_device.py peak|train|kernels [--cpu-smoke] [--steps 5] [--json out.json]

`peak` times a large bf16 matmul (and f32) on the default device. `train` times the train step of
configs/llama_1b.yaml (bf16 compute, `dots` remat) at one micro-batch per device and reports MFU
against the measured bf16 peak and the data-sheet peak. `kernels` times forward + backward of the
token-dropped attention and the weight-only int8 matmul, Pallas kernel against the XLA path (the
Evoformer kernel has its own benchmark, scripts/bench_evoformer.py). `--cpu-smoke` shrinks every
shape so the script runs on a CPU in seconds (kernels interpreted), to check it before device time.
Needs no Grain: batches are built here rather than by the data pipeline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` after one call that compiles and warms it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype, size: int, iters: int) -> float:
    """FLOP/s of `iters` chained `size`^3 matmuls in one program (no per-call dispatch in the timing)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype) / size**0.5

    @jax.jit
    def chain(x):
        # The result feeds the next dot, so XLA can neither drop nor merge the iterations.
        return jax.lax.fori_loop(0, iters, lambda _, y: jnp.dot(y, a, preferred_element_type=jnp.float32
                                                                 ).astype(dtype), x)

    return iters * 2 * size**3 / timed(chain, a, repeats=3)


def peak(smoke: bool) -> dict:
    size, iters = (256, 2) if smoke else (8192, 20)
    out = {"device": jax.devices()[0].device_kind, "size": size,
           "bf16_flops": matmul_peak(jnp.bfloat16, size, iters), "f32_flops": matmul_peak(jnp.float32, size, iters)}
    print(f"matmul peak on {out['device']} ({size}^3): bf16 in, f32 acc {out['bf16_flops'] / 1e12:.1f} TFLOP/s; "
          f"f32 {out['f32_flops'] / 1e12:.1f} TFLOP/s (default precision)")
    return out


SMOKE_MODEL = ["model.layers=2", "model.d_model=64", "model.heads=4", "model.kv_heads=2", "model.d_ff=128",
               "model.vocab_size=256", "model.max_len=32", "data.seq_len=32"]


def train(smoke: bool, steps: int, batch_per_device: int, overrides: list[str]) -> dict:
    from jaxllm import config as config_lib
    from jaxllm import mesh as mesh_lib
    from jaxllm.metrics import flops_per_token, peak_flops
    from jaxllm.pretraining import LanguageModelTraining

    devices = jax.devices()
    batch = batch_per_device * len(devices)
    cfg = config_lib.load(REPO / "configs" / "llama_1b.yaml", [
        "data.source=synthetic", f"train.batch_size={batch}", "train.grad_accum=1", *(SMOKE_MODEL if smoke else []),
        *overrides])
    seq, vocab = cfg.data.seq_len, cfg.model.vocab_size
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rng = np.random.default_rng(0)

    def make_batch():
        tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
                "loss_mask": np.ones((batch, seq), np.float32)}

    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(cfg, mesh)
        state, step = task.init_state(), task.train_step()
        sharding = mesh_lib.batch_sharding(mesh)
        batches = [{k: jax.device_put(v, sharding) for k, v in make_batch().items()} for _ in range(2)]
        start = time.perf_counter()
        state, metrics = step(state, batches[0])
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, batches[(i + 1) % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch * seq / seconds
    model_flops = tokens * flops_per_token(cfg.model, seq)
    peaks = peak(smoke)
    measured = peaks["bf16_flops"] * len(devices)
    sheet, sheet_source = peak_flops(cfg.model.compute_dtype, devices)
    out = {"devices": len(devices), "batch": batch, "seq_len": seq, "compile_and_first_step_s": first,
           "step_s": seconds, "tokens_per_sec": tokens, "mfu_measured_peak": model_flops / measured,
           "mfu_data_sheet": model_flops / sheet, "data_sheet_source": sheet_source,
           "loss": float(metrics["loss"]), "peak": peaks}
    print(f"llama_1b bf16 train step: {len(devices)} device(s), batch {batch} x {seq}: {seconds * 1e3:.1f} ms "
          f"(first step with compile {first:.1f} s), {tokens:,.0f} tokens/s, MFU {100 * out['mfu_measured_peak']:.1f}% "
          f"of the measured bf16 peak, {100 * out['mfu_data_sheet']:.1f}% of {sheet_source}; loss {out['loss']:.3f}")
    return out


def kernels(smoke: bool, repeats: int) -> dict:
    from jaxllm.compression.qtensor import QuantSpec, quantize_weight
    from jaxllm.ops.token_dropped_attention import token_dropped_attention
    from pallas_kernels.quantized_matmul import column_scales, quantized_matmul

    interpret = jax.default_backend() == "cpu"
    results = {}

    # Token-dropped attention: kept tokens of a causal, one-segment row, bf16, forward + backward.
    b, r, h, kv, d = (1, 32, 2, 2, 16) if smoke else (4, 2048, 16, 16, 64)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, r, h, d), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, r, kv, d), jnp.bfloat16) for key in keys[1:])
    idx = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32) * 2, (b, r))  # every other token of 2r kept
    seg, pos = jnp.ones((b, r), jnp.int32), idx
    for impl in ("xla", "pallas"):
        def loss(q, k, v, seg, pos, idx, impl=impl):
            out = token_dropped_attention(q, k, v, seg, pos, idx, None, jnp.bfloat16, implementation=impl,
                                          interpret=interpret)
            return jnp.sum(out.astype(jnp.float32))

        results[f"token_dropped_attention_{impl}_s"] = timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v,
                                                             seg, pos, idx, repeats=repeats)

    # Weight-only int8 matmul: bf16 activations, forward + backward to x, against dequantize-then-dot.
    m, kk, n = (16, 64, 32) if smoke else (8192, 4096, 4096)
    w = quantize_weight(jax.random.normal(keys[0], (kk, n)), QuantSpec("w", weight_bits=8, weight_groups=n,
                                                                       weight_symmetric=True))
    x = jax.random.normal(keys[1], (m, kk), jnp.bfloat16)
    blocks = dict(block_m=16, block_n=16, block_k=16) if smoke else {}
    # The weight is an argument, not a closed-over constant, so XLA cannot fold the dequantisation away.
    variants = {
        "xla": lambda x, w: jnp.dot(x, w.dequantize().astype(jnp.bfloat16), preferred_element_type=jnp.float32),
        "pallas": lambda x, w: quantized_matmul(x, w.codes, column_scales(w.scale, n), bits=8, signed=w.signed, k=kk,
                                                interpret=interpret, **blocks),
    }
    for impl, fn in variants.items():
        results[f"int8_weight_matmul_{impl}_s"] = timed(jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w)))), x,
                                                        w, repeats=repeats)
    for name in ("token_dropped_attention", "int8_weight_matmul"):
        xla, pallas = results[f"{name}_xla_s"], results[f"{name}_pallas_s"]
        print(f"{name:>24}: XLA {xla * 1e3:8.2f} ms, Pallas {pallas * 1e3:8.2f} ms, XLA/Pallas {xla / pallas:.2f}x "
              "(forward + backward)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["peak", "train", "kernels"])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes; runs on a CPU in seconds")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps / kernel repeats")
    parser.add_argument("--batch-per-device", type=int, default=8, help="sequences of 2048 tokens per device")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="section.key=value for the train check")
    args = parser.parse_args()
    if args.what == "peak":
        out = peak(args.cpu_smoke)
    elif args.what == "train":
        out = train(args.cpu_smoke, args.steps, args.batch_per_device, args.overrides)
    else:
        out = kernels(args.cpu_smoke, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
