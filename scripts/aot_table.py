"""Compiles each recipe of `RECIPES` with `python -m jaxllm.aot` and prints the table of docs/aot.md.

    python scripts/aot_table.py [--only NAME ...] [--json runs/aot_table.json]

Each recipe is a preset, a target and the overrides that place it on the target's devices; each is
compiled in a process of its own (the TPU and GPU compilers need the aot extra: pip install -e ".[aot]").
The table gives per device the compiler's total memory and `--dry-run`'s estimate, the headroom, the
compiled FLOPs against the model's, and the compile seconds on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# name: (config, target, overrides). LLM-jp 13B and BLOOM-176B at the global batch and sequence length
# of their published training runs (the presets' batch_size x seq_len, reached by gradient accumulation).
RECIPES = {
    "GPT-2 124M": ("configs/gpt2_124m.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=64",
                                                             "train.grad_accum=4"]),
    "GPT-2 124M ": ("configs/gpt2_124m.yaml", "gpu:h100:1x8", ["mesh.fsdp=8", "train.batch_size=64",
                                                               "train.grad_accum=2"]),
    "BLOOM-560m": ("configs/bloom_560m.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=32",
                                                              "train.grad_accum=8"]),
    "BLOOM-560m ": ("configs/bloom_560m.yaml", "gpu:h100:1x8", ["mesh.fsdp=8", "train.batch_size=32",
                                                                "train.grad_accum=2"]),
    "Llama 1B, batch 16": ("configs/llama_1b.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=16",
                                                                    "train.grad_accum=1"]),
    "Llama 1B": ("configs/llama_1b.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=16",
                                                          "train.grad_accum=4"]),
    "Llama 1B ": ("configs/llama_1b.yaml", "gpu:h100:1x8", ["mesh.fsdp=8", "train.batch_size=16",
                                                            "train.grad_accum=2"]),
    "LLM-jp 13B": ("configs/llmjp_13b.yaml", "tpu:v5p:4x4x4", ["mesh.fsdp=64", "train.grad_accum=16"]),
    "LLM-jp 13B ": ("configs/llmjp_13b.yaml", "gpu:h100:8x8", ["mesh.fsdp=64", "train.grad_accum=16"]),
    "BLOOM-176B": ("configs/bloom_176b.yaml", "tpu:v5p:8x8x4", ["mesh.tensor=8", "mesh.fsdp=32"]),
    "BLOOM-176B ": ("configs/bloom_176b.yaml", "gpu:h100:32x8", ["mesh.tensor=8", "mesh.fsdp=32"]),
}


def compile_recipe(config: str, target: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "jaxllm.aot", f"--config={config}", f"--target={target}", f"--json={out}",
               *overrides]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if result.returncode not in (0, 3):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def row(name: str, r: dict) -> str:
    flops = "-"
    if r["compiled_flops"] and not r["scanned_layers"]:  # like for like: one micro-batch (see jaxllm.aot)
        flops = f"{r['compiled_flops'] / (r['model_flops'] / r['micro_batches']):.2f}x"
    memory = f"{r['total'] / GIB:.2f}" if not r["error"] else f"refused ({r['temporaries'] / GIB:.2f} temporaries)"
    headroom = f"{r['headroom']:.0%}" if r["fits"] else "does not fit"
    return (f"| {name.strip()} | {r['target']} | {r['devices']} | {memory} | {r['estimate'] / GIB:.2f} | "
            f"{r['capacity'] / GIB:.2f} | {headroom} | {flops} | {r['compile_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--json", help="also write every report here")
    args = parser.parse_args()
    names = args.only or list(RECIPES)
    print("| recipe | target | devices | compiler GiB/device | estimate GiB | device GiB | headroom | "
          "compiled / model FLOPs per micro-batch | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    reports = {}
    for name in names:
        reports[name] = compile_recipe(*RECIPES[name])
        print(row(name, reports[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
