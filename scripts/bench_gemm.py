"""f32 GEMM rates of the reference model's shapes: XLA (under several XLA_FLAGS) against `torch.mm`.

    python scripts/bench_gemm.py [--flags "--xla_cpu_...=..." ...] [--repeats 5]

The shapes are those of `configs/gpt2_6l_512d.yaml`'s train step (2048 tokens, d_model 512, MLP 2048,
fused QKV 1536, vocabulary 32000); the last two contract over the tokens as weight gradients do
(`x^T y`). Every XLA flag set runs in its own process (XLA reads XLA_FLAGS once); the default flags
always run first, and PyTorch (extra `bench`) runs if it is installed. Each rate is the best of
`--repeats` timed calls after one warm-up call, in GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(2048, 512, 32000), (2048, 512, 1536), (2048, 2048, 512), (2048, 32000, 512), (512, 2048, 1536),
          (512, 2048, 32000)]
TRANSPOSED = [(512, 2048, 1536), (512, 2048, 32000)]  # m x k x n with the k-by-m operand stored [k, m]
LABELS = [f"{m} x {k} x {n}" for m, k, n in SHAPES] + [f"{m} x {k} x {n} (x^T y)" for m, k, n in TRANSPOSED]


def best_rate(call, flops: float, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9


def xla_rates(repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for (m, k, n), transposed in [(s, False) for s in SHAPES] + [(s, True) for s in TRANSPOSED]:
        a = jnp.asarray(rng.random((k, m) if transposed else (m, k), np.float32))
        b = jnp.asarray(rng.random((k, n), np.float32))
        dims = (((0,), (0,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
        f = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        out.append(best_rate(lambda f=f, a=a, b=b: f(a, b).block_until_ready(), 2 * m * k * n, repeats))
    return out


def torch_rates(repeats: int) -> list[float]:
    import torch

    torch.manual_seed(0)
    out = []
    for (m, k, n), transposed in [(s, False) for s in SHAPES] + [(s, True) for s in TRANSPOSED]:
        a = torch.rand(k, m) if transposed else torch.rand(m, k)
        b = torch.rand(k, n)
        call = (lambda a=a, b=b: a.t() @ b) if transposed else (lambda a=a, b=b: a @ b)
        out.append(best_rate(call, 2 * m * k * n, repeats))
    return out


def child(side: str, flags: str, repeats: int) -> list[float] | None:
    env = {**os.environ, "XLA_FLAGS": flags}
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--repeats", str(repeats)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{side} {flags or '(default flags)'}: failed\n{proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", action="append", default=[], help="an XLA_FLAGS value to compare (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["xla", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rates = xla_rates(args.repeats) if args.worker == "xla" else torch_rates(args.repeats)
        print(json.dumps(rates))
        return
    columns = {"XLA": child("xla", "", args.repeats)}
    for flags in args.flags:
        columns[f"XLA {flags}"] = child("xla", flags, args.repeats)
    try:
        import torch  # noqa: F401
        columns["torch.mm"] = child("torch", "", args.repeats)
    except ImportError:
        print("torch is not installed (extra `bench`): PyTorch column skipped", file=sys.stderr)
    columns = {name: rates for name, rates in columns.items() if rates is not None}
    for i, name in enumerate(columns):
        print(f"[{i}] {name}")
    print(f"\n{'m x k x n':<28}" + "".join(f"{f'[{i}]':>8}" for i in range(len(columns))))
    for row, label in enumerate(LABELS):
        print(f"{label:<28}" + "".join(f"{rates[row]:8.0f}" for rates in columns.values()))
    print(f"{'mean':<28}" + "".join(f"{statistics.mean(rates):8.0f}" for rates in columns.values()))


if __name__ == "__main__":
    main()
