"""Compiles each recipe of `RECIPES` with `python -m jaxllm.aot` and prints the table of docs/aot.md.

    python scripts/aot_table.py [--only NAME ...] [--json runs/aot_table.json] [--stages]

Each recipe is a config file in configs/recipes/ (a preset with the mesh and batch that place it on
the target's devices) and its target; each is compiled in a process of its own (the compilers come with
the aot and aot-gpu extras). The table gives per device the compiler's total memory and `--dry-run`'s
estimate, the headroom, the compiled FLOPs against the model's, and the compile seconds on this machine.
`--stages` prints docs/pipeline.md's table instead: the mesh, the pipeline schedule, its padded block
slots and bubble (`jaxllm.models.pipeline`) beside the compiler's device and host memory.
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
# name: (config, target, overrides). Each recipe is a file in configs/recipes/ (its preset plus a mesh
# and a batch); LLM-jp 13B and BLOOM-176B run at the global batch and sequence length of their published
# training runs (the presets' batch_size x seq_len, reached by gradient accumulation). The one entry
# with overrides shows a step the compiler refuses: the Llama 1B recipe in one micro-batch of 16.
RECIPES = {
    "GPT-2 124M": ("configs/recipes/gpt2_124m.tpu_v5e_2x2.yaml", "tpu:v5e:2x2", []),
    "GPT-2 124M ": ("configs/recipes/gpt2_124m.gpu_h100_1x8.yaml", "gpu:h100:1x8", []),
    "BLOOM-560m": ("configs/recipes/bloom_560m.tpu_v5e_2x2.yaml", "tpu:v5e:2x2", []),
    "BLOOM-560m ": ("configs/recipes/bloom_560m.gpu_h100_1x8.yaml", "gpu:h100:1x8", []),
    "Llama 1B, batch 16": ("configs/recipes/llama_1b.tpu_v5e_2x2.yaml", "tpu:v5e:2x2", ["train.grad_accum=1"]),
    "Llama 1B": ("configs/recipes/llama_1b.tpu_v5e_2x2.yaml", "tpu:v5e:2x2", []),
    "Llama 1B ": ("configs/recipes/llama_1b.gpu_h100_1x8.yaml", "gpu:h100:1x8", []),
    "LLM-jp 13B": ("configs/recipes/llmjp_13b.tpu_v5p_4x4x4.yaml", "tpu:v5p:4x4x4", []),
    "LLM-jp 13B ": ("configs/recipes/llmjp_13b.gpu_h100_8x8.yaml", "gpu:h100:8x8", []),
    "BLOOM-176B": ("configs/recipes/bloom_176b.tpu_v5p_8x8x4.yaml", "tpu:v5p:8x8x4", []),
    "BLOOM-176B ": ("configs/recipes/bloom_176b.gpu_h100_32x8.yaml", "gpu:h100:32x8", []),
    # Pipeline stages (docs/pipeline.md). The overrides row shows a step that does not fit: BLOOM-176B
    # with ZeRO-1 on only 8 stages.
    "BLOOM-176B, 12 stages, ZeRO-1": ("configs/recipes/bloom_176b.gpu_a100_48x8.yaml", "gpu:a100-80g:48x8", []),
    "BLOOM-176B, 16 stages, ZeRO-1": ("configs/recipes/bloom_176b.gpu_a100_64x8.yaml", "gpu:a100-80g:64x8", []),
    "BLOOM-176B, 8 stages, ZeRO-1": ("configs/recipes/bloom_176b.gpu_a100_32x8.yaml", "gpu:a100-80g:32x8",
                                     ["mesh.zero_stage=1", "mesh.pipeline_microbatches=8", "train.grad_accum=32"]),
    "BLOOM-176B, 8 stages, ZeRO-3": ("configs/recipes/bloom_176b.gpu_a100_32x8.yaml", "gpu:a100-80g:32x8", []),
    "LLM-jp 13B, 4 stages": ("configs/recipes/llmjp_13b.gpu_h100_8x8_stage4.yaml", "gpu:h100:8x8", []),
    # Host offload (docs/offload.md): the same step without it does not fit on the one chip.
    "Llama 1B, offload": ("configs/recipes/llama_1b.tpu_v5e_1x1_offload.yaml", "tpu:v5e:1x1", []),
    "Llama 1B, no offload": ("configs/recipes/llama_1b.tpu_v5e_1x1_offload.yaml", "tpu:v5e:1x1", ["mesh.offload=none"]),
    # The f32 parameters in host memory too: room for twice the rows.
    "Llama 1B, offload with parameters": ("configs/recipes/llama_1b.tpu_v5e_1x1_offload.yaml", "tpu:v5e:1x1",
                                          ["mesh.offload=optimizer_and_params", "train.batch_size=2"]),
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


def stages_row(name: str, config: str, overrides: list[str], r: dict) -> str:
    """docs/pipeline.md's columns: the mesh, the schedule and its bubble beside the memory."""
    sys.path.insert(0, str(REPO))
    from jaxllm import config as config_lib
    from jaxllm.mesh import PipelineSettings
    from jaxllm.models.pipeline import bubble_fraction, slots

    cfg = config_lib.load(REPO / config, overrides)
    mesh = cfg.mesh
    settings = PipelineSettings.of(mesh)
    per_group, padded = slots(cfg.model.layers, mesh.stage * mesh.pipeline_repeats)
    total_slots = per_group * mesh.stage * mesh.pipeline_repeats
    axes = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items() if size > 1)
    schedule = f"{mesh.pipeline_schedule} R={mesh.pipeline_repeats}, M={mesh.microbatches()}, " \
               f"G={cfg.train.grad_accum}, ZeRO-{mesh.zero_stage}"
    memory = f"{r['total'] / GIB:.2f}" + ("" if r["fits"] else " (does not fit)")
    return (f"| {name.strip()} | {r['target']} | {axes} | {schedule} | {padded}/{total_slots} "
            f"| {memory} | {r['capacity'] / GIB:.0f} | {r['host_total'] / GIB:.2f} | {bubble_fraction(settings):.3f} "
            f"| {r['compile_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--json", help="also write every report here")
    parser.add_argument("--stages", action="store_true", help="docs/pipeline.md's table (mesh, schedule, bubble)")
    args = parser.parse_args()
    names = args.only or list(RECIPES)
    if args.stages:
        print("| recipe | target | mesh | schedule | padded slots | compiler GiB/device | device GiB | host GiB | "
              "bubble | compile s |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    else:
        print("| recipe | target | devices | compiler GiB/device | estimate GiB | device GiB | headroom | "
              "compiled / model FLOPs per micro-batch | compile s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    reports = {}
    for name in names:
        reports[name] = compile_recipe(*RECIPES[name])
        print(stages_row(name, *RECIPES[name][::2], reports[name]) if args.stages else row(name, reports[name]),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
