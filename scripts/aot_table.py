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
# name: (config, target, overrides)
RECIPES = {
    "gpt2-124m v5e": ("configs/gpt2_124m.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=16",
                                                                "train.grad_accum=1"]),
    "gpt2-124m h100": ("configs/gpt2_124m.yaml", "gpu:h100:1x8", ["mesh.fsdp=8", "train.batch_size=16",
                                                                  "train.grad_accum=1"]),
    "llama-1b v5e, batch 16": ("configs/llama_1b.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=16",
                                                                        "train.grad_accum=1"]),
    "llama-1b v5e, batch 4": ("configs/llama_1b.yaml", "tpu:v5e:2x2", ["mesh.fsdp=4", "train.batch_size=4",
                                                                       "train.grad_accum=1"]),
    "llama-1b h100": ("configs/llama_1b.yaml", "gpu:h100:1x8", ["mesh.fsdp=8", "train.batch_size=8",
                                                                "train.grad_accum=1"]),
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
    flops = f"{r['compiled_flops'] / r['model_flops']:.2f}x" if r["compiled_flops"] else "-"
    memory = f"{r['total'] / GIB:.2f}" if not r["error"] else f"refused ({r['temporaries'] / GIB:.2f} temporaries)"
    headroom = f"{r['headroom']:.0%}" if r["fits"] else "does not fit"
    return (f"| {name} | {r['target']} | {r['devices']} | {memory} | {r['estimate'] / GIB:.2f} | "
            f"{r['capacity'] / GIB:.2f} | {headroom} | {flops} | {r['compile_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--json", help="also write every report here")
    args = parser.parse_args()
    names = args.only or list(RECIPES)
    print("| recipe | target | devices | compiler GiB/device | estimate GiB | device GiB | headroom | "
          "compiled / model FLOPs | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    reports = {}
    for name in names:
        reports[name] = compile_recipe(*RECIPES[name])
        print(row(name, reports[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
