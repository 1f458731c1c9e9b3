"""Evoformer attention: memory and time of forward + backward, memory-efficient op vs the naive one.

    python scripts/bench_evoformer.py [--lengths 256 512 1024] [--batch 1] [--rows 16] [--heads 4]
                                      [--head-dim 32] [--dtype float32] [--repeats 3] [--json out.json]

Shapes are MSA row attention with pair bias (AlphaFold 2 Algorithm 7, DeepSpeed4Science's layout):
q, k, v `[B, N, L, H, D]`, a key mask `[B, N, 1, 1, L]` and a pair bias `[B, 1, H, L, L]`. The
measured function is `grad` of `sum(out * w)` (a fixed random `w`) with respect to q, k, v and the
pair bias, jitted. For each L and each implementation the table gives the compiled temporary memory
(`jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`: every buffer XLA needs
beyond the arguments and outputs), the total with arguments and outputs, and the median wall time
of `--repeats` calls after one warm-up.

Implementations: `naive` is `jaxllm.ops.evoformer_attention_reference` under plain autodiff (every
`[B, N, H, L, L]` score, probability and gradient materialised in f32); `xla` is
`jaxllm.ops.evoformer_attention(..., implementation="xla")`. On a GPU the Pallas kernel is timed as
well (`pallas`) and the card is printed. Ratios are naive / xla.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pallas_kernels/ beside jaxllm/
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_device import timed  # noqa: E402

from jaxllm.ops.evoformer import evoformer_attention, evoformer_attention_reference  # noqa: E402


def implementations(include_pallas: bool):
    impls = {
        "naive": lambda q, k, v, mask, pair: evoformer_attention_reference(q, k, v, [mask, pair]),
        "xla": lambda q, k, v, mask, pair: evoformer_attention(q, k, v, [mask, pair], implementation="xla"),
    }
    if include_pallas:
        impls["pallas"] = lambda q, k, v, mask, pair: evoformer_attention(q, k, v, [mask, pair],
                                                                          implementation="pallas")
    return impls


def inputs(length: int, args, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, n, h, d = args.batch, args.rows, args.heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    mask = jnp.asarray(1e9 * ((rng.random((b, n, 1, 1, length)) < 0.9) - 1.0), dtype)
    return (normal(b, n, length, h, d), normal(b, n, length, h, d), normal(b, n, length, h, d), mask,
            normal(b, 1, h, length, length)), normal(b, n, length, h, d)


def measure(fn, operands, weight, repeats: int) -> dict[str, float]:
    loss = lambda q, k, v, mask, pair: jnp.sum(fn(q, k, v, mask, pair).astype(jnp.float32) * weight)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))
    start = time.perf_counter()
    compiled = grad.lower(*operands).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {"temp_bytes": int(memory.temp_size_in_bytes), "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes), "seconds": timed(compiled, *operands, repeats=repeats),
            "compile_seconds": compile_s}


def card(device) -> str:
    """The accelerator's name, or the CPU model on CPU."""
    if device.platform != "cpu":
        return device.device_kind
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=16, help="N: MSA sequences (rows)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pallas", action="store_true", help="also run the Pallas kernel (default: on GPU only)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    include_pallas = args.pallas or jax.default_backend() == "gpu"
    print(f"device: {card(device)} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"shapes: B={args.batch} N={args.rows} H={args.heads} D={args.head_dim} {args.dtype}; "
          "biases: mask [B,N,1,1,L] + pair [B,1,H,L,L]; grad wrt q, k, v, pair")
    rows = []
    for length in args.lengths:
        operands, weight = inputs(length, args)
        row = {"length": length}
        for name, fn in implementations(include_pallas).items():
            row[name] = measure(fn, operands, weight, args.repeats)
        rows.append(row)

    names = [n for n in ("naive", "xla", "pallas") if n in rows[0]]
    mib = lambda r, n, key: r[n][key] / 2**20  # noqa: E731
    total = lambda r, n: sum(r[n][key] for key in ("temp_bytes", "argument_bytes", "output_bytes"))  # noqa: E731
    header = (f"{'L':>5} | " + " | ".join(f"{n + ' temp MiB':>15}" for n in names) + " | temp ratio | "
              + " | ".join(f"{n + ' total MiB':>16}" for n in names) + " | total ratio | "
              + " | ".join(f"{n + ' s':>9}" for n in names) + " | time ratio")
    print(header)
    print("-" * len(header))
    for row in rows:
        row["temp_ratio"] = row["naive"]["temp_bytes"] / max(row["xla"]["temp_bytes"], 1)
        row["total_ratio"] = total(row, "naive") / total(row, "xla")
        row["time_ratio"] = row["naive"]["seconds"] / row["xla"]["seconds"]
        print(f"{row['length']:>5} | " + " | ".join(f"{mib(row, n, 'temp_bytes'):>15.1f}" for n in names)
              + f" | {row['temp_ratio']:>9.1f}x | "
              + " | ".join(f"{total(row, n) / 2**20:>16.1f}" for n in names) + f" | {row['total_ratio']:>10.1f}x | "
              + " | ".join(f"{row[n]['seconds']:>9.3f}" for n in names) + f" | {row['time_ratio']:>9.2f}x")
    print("temp: XLA's temporary buffers; total: temp + arguments + outputs (q, k, v, biases and their "
          "gradients, the same for every implementation). Ratios: naive / xla.")
    if args.json:
        args.json.write_text(json.dumps({"device": card(device), "backend": jax.default_backend(),
                                         "jax": jax.__version__, "config": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
