"""Training throughput and MFU of one model config in f32 and bf16 compute, measured in one run.

    python scripts/bench_train.py [--steps 3] [--json out.json] [section.key=value ...]

Defaults to the reference config `configs/gpt2_6l_512d.yaml`: GPT-2, 6 layers, d_model 512, 8 heads,
seq 256, vocab 32000, global batch 8, synthetic data, one device (whatever `jax.devices()[0]` is).
Each dtype compiles,
runs one warm-up step, then times `--steps` steps; the table gives tokens/s, MFU against the peak of
the same dtype (measured on CPU), and the bf16/f32 ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.data.pipeline import SyntheticRows, stack_rows
from jaxllm.metrics import flops_per_token, peak_flops
from jaxllm.pretraining import LanguageModelTraining

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "gpt2_6l_512d.yaml"


def measure(overrides: list[str], steps: int) -> dict[str, float]:
    cfg = config_lib.load(REFERENCE, ["mesh.data=1", *overrides])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    rows = SyntheticRows(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size * (steps + 1))
    batches = [stack_rows([rows[i * cfg.train.batch_size + j] for j in range(cfg.train.batch_size)])
               for i in range(steps + 1)]
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(cfg, mesh)
        state, step = task.init_state(), task.train_step()
        sharding = mesh_lib.batch_sharding(mesh)
        put = lambda b: {k: jax.device_put(v, sharding) for k, v in b.items()}  # noqa: E731
        start = time.perf_counter()
        state, metrics = step(state, put(batches[0]))
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for batch in batches[1:]:
            start = time.perf_counter()
            state, metrics = step(state, put(batch))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    tokens = cfg.train.batch_size * cfg.data.seq_len / seconds
    peak, peak_source = peak_flops(cfg.model.compute_dtype, jax.devices()[:1])
    return {"compute_dtype": cfg.model.compute_dtype, "compile_and_first_step_s": first, "step_s": seconds,
            "tokens_per_sec": tokens, "mfu": tokens * flops_per_token(cfg.model, cfg.data.seq_len) / peak,
            "peak_flops": peak, "peak_source": peak_source, "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = [measure([*args.overrides, f"model.compute_dtype={dtype}"], args.steps)
               for dtype in ("float32", "bfloat16")]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), {args.steps} timed steps, median")
    print(f"{'compute':>9} {'step s':>8} {'tokens/s':>9} {'MFU':>6}  peak")
    for r in results:
        print(f"{r['compute_dtype']:>9} {r['step_s']:8.3f} {r['tokens_per_sec']:9.0f} {100 * r['mfu']:5.1f}%  "
              f"{r['peak_flops'] / 1e9:.0f} GFLOP/s ({r['peak_source']})")
    print(f"bf16 / f32 throughput: {results[1]['tokens_per_sec'] / results[0]['tokens_per_sec']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
