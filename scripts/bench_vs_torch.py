"""jaxllm against Hugging Face transformers + PyTorch eager on one model, f32 and bf16, in one run.

    pip install -c constraints.txt -e ".[bench]"
    python scripts/bench_vs_torch.py [--steps 4] [--repeats 2] [--dtypes float32,bfloat16] [--json out.json]

Model: configs/gpt2_6l_512d.yaml (GPT-2, 6 layers, d_model 512, 8 heads, seq 256, vocab 32000, batch 8,
tied head, no dropout), AdamW with global-norm clipping. Both sides run as child processes so each
starts clean and neither holds the other's memory or threads:

- jaxllm: `python -m jaxllm.train` on synthetic data with one metrics row per step; the data pipeline,
  host transfer and logging are inside the measured time. Throughput is the median of the rows
  after the first (which includes compilation). bf16 is `model.compute_dtype=bfloat16`.
- PyTorch: `transformers.GPT2LMHeadModel` + `torch.optim.AdamW` (its default implementation) +
  `clip_grad_norm_`, eager, random tokens; the median step after one warm-up step. bf16 is
  `torch.autocast("cpu", torch.bfloat16)`; the loss is f32 cross-entropy over the full vocabulary.

Each repeat runs every (dtype, side) pair in turn, jaxllm then PyTorch, so drift on a shared machine
hits both sides alike; the table reports the median over repeats. MFU uses jaxllm's FLOPs-per-token
convention (jaxllm/metrics.py) for both sides against the peak of a large `jnp.dot` measured here:
f32, and bf16 inputs with f32 accumulation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gpt2_6l_512d.yaml"


def run_jaxllm(dtype: str, steps: int, workdir: Path) -> list[float]:
    """tokens/s of each logged step after the first, from `python -m jaxllm.train`'s metrics.jsonl."""
    cmd = [sys.executable, "-m", "jaxllm.train", f"--config={CONFIG}", f"--workdir={workdir}",
           f"model.compute_dtype={dtype}", f"train.steps={steps + 1}", "train.log_every=1", "mesh.data=1",
           "log.progress_bar=false", "log.tensorboard=false"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"jaxllm run failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r and r["step"] > 1]


def run_torch(dtype: str, steps: int) -> list[float]:
    done = subprocess.run([sys.executable, __file__, "--torch-worker", dtype, "--steps", str(steps)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"PyTorch run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_worker(dtype: str, steps: int) -> None:
    """Trains the reference GPT-2 with transformers + torch.optim.AdamW; prints per-step tokens/s as JSON."""
    import torch
    import yaml
    from transformers import GPT2Config, GPT2LMHeadModel

    ref = yaml.safe_load(CONFIG.read_text())
    m, batch, seq = ref["model"], ref["train"]["batch_size"], ref["data"]["seq_len"]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=m["vocab_size"], n_positions=m["max_len"], n_embd=m["d_model"],
                        n_layer=m["layers"], n_head=m["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()
    # jaxllm's optimizer defaults (jaxllm/config.py OptimizerConfig), so both sides do the same update.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step() -> None:
        tokens = torch.randint(0, m["vocab_size"], (batch, seq + 1))
        with autocast:
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, autocast caches, optimizer state
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        rates.append(batch * seq / (time.perf_counter() - start))
    print(json.dumps(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after the first)")
    parser.add_argument("--repeats", type=int, default=2, help="A B A B rounds; the median is reported")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--torch-worker", metavar="DTYPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        return torch_worker(args.torch_worker, args.steps)

    import jax

    from jaxllm import config as config_lib
    from jaxllm.metrics import flops_per_token, measure_cpu_peak

    dtypes = args.dtypes.split(",")
    cfg = config_lib.load(CONFIG, [])
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    # Measured before and after the runs: the larger is the peak, the smaller shows how noisy the host is.
    peaks_before = {d: measure_cpu_peak.__wrapped__(d, repeats=5) for d in dtypes}
    rates: dict[tuple[str, str], list[float]] = {(d, s): [] for d in dtypes for s in ("jaxllm", "torch")}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for d in dtypes:
                rates[d, "jaxllm"].append(statistics.median(run_jaxllm(d, args.steps, Path(tmp) / f"{d}-{r}")))
                rates[d, "torch"].append(statistics.median(run_torch(d, args.steps)))
                print(f"round {r + 1}/{args.repeats} {d}: jaxllm {rates[d, 'jaxllm'][-1]:.0f}, "
                      f"torch {rates[d, 'torch'][-1]:.0f} tokens/s", flush=True)
    peaks_after = {d: measure_cpu_peak.__wrapped__(d, repeats=5) for d in dtypes}
    peaks = {d: max(peaks_before[d], peaks_after[d]) for d in dtypes}

    results = []
    for d in dtypes:
        jx, pt = statistics.median(rates[d, "jaxllm"]), statistics.median(rates[d, "torch"])
        # Each round's ratio pairs runs made back to back, so it is less exposed to drift than jx / pt.
        paired = [a / b for a, b in zip(rates[d, "jaxllm"], rates[d, "torch"], strict=True)]
        results.append({"dtype": d, "jaxllm_tokens_per_sec": jx, "torch_tokens_per_sec": pt, "ratio": jx / pt,
                        "round_ratios": paired, "median_round_ratio": statistics.median(paired),
                        "jaxllm_mfu": jx * flops / peaks[d], "torch_mfu": pt * flops / peaks[d],
                        "peak_flops": peaks[d], "peak_flops_before": peaks_before[d],
                        "peak_flops_after": peaks_after[d], "jaxllm_rounds": rates[d, "jaxllm"],
                        "torch_rounds": rates[d, "torch"]})
    import torch
    import transformers

    device = jax.devices()[0]
    print(f"\n{device.device_kind} ({device.platform}), {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {args.steps} steps x "
          f"{args.repeats} rounds, medians; {flops / 1e6:.0f} MFLOP/token; {time.perf_counter() - began:.0f} s")
    print(f"{'dtype':>9} {'jaxllm tok/s':>12} {'torch tok/s':>11} {'ratio':>6} {'jaxllm MFU':>10} "
          f"{'torch MFU':>9}  matmul peak")
    for r in results:
        peak_name = "f32" if r["dtype"] == "float32" else "bf16 in, f32 acc"
        print(f"{r['dtype']:>9} {r['jaxllm_tokens_per_sec']:12.0f} {r['torch_tokens_per_sec']:11.0f} "
              f"{r['ratio']:5.2f}x {100 * r['jaxllm_mfu']:9.1f}% {100 * r['torch_mfu']:8.1f}%  "
              f"{r['peak_flops'] / 1e9:.0f} GFLOP/s ({peak_name}; {r['peak_flops_before'] / 1e9:.0f} before, "
              f"{r['peak_flops_after'] / 1e9:.0f} after)")
        print(f"{'':>9} per-round ratios {', '.join(f'{x:.2f}' for x in r['round_ratios'])}; "
              f"median {r['median_round_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "cores": os.cpu_count(), "steps": args.steps,
                       "repeats": args.repeats, "flops_per_token": flops, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
