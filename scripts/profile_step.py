"""Where a train step's time goes: per-op device time from a `jax.profiler` trace of the compiled step.

    python scripts/profile_step.py [--steps 3] [--top 25] [--trace-dir DIR] [section.key=value ...]

Builds the train step of `configs/gpt2_6l_512d.yaml` (the reference GPT-2 of `scripts/bench_train.py`
and `scripts/bench_vs_torch.py`: 6 layers, d_model 512, seq 256, vocab 32000, batch 8; f32, one
device), runs one warm-up step, then traces `--steps` steps with `create_perfetto_trace=True` and adds
up the duration of every XLA op (thunk) event by op name.
Ops are grouped by the pass they belong to (forward, backward, update) and by what their HLO does (the
compiled module's instruction of that name): matmul (dot, or a fusion holding one), reduction,
elementwise/other fusion, copy/transpose, and the rest.
The op time is summed over all of XLA's worker threads, so it can exceed the wall time when ops run
in parallel; the table also gives the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.data.pipeline import SyntheticRows, stack_rows
from jaxllm.pretraining import LanguageModelTraining

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "gpt2_6l_512d.yaml"


def op_passes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the pass it belongs to, from its `op_name` metadata: forward (under `jvp`),
    backward (under `transpose(jvp`), or update (optimizer, clipping, metrics: everything else)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*op_name=\"([^\"]*)\"", line)
        if m:
            name, op_name = m.groups()
            out[name] = "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "update"
    return out


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> group, from the compiled HLO text (fusions by the ops of their body)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            bodies[current] = []
        elif current and "=" in line:
            bodies[current].append(line)
    kinds = {}
    for lines in bodies.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+(?:\s*\{[^}]*\})?\s+([\w\-]+)\(", line)
            if not m:
                m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?\s([\w\-]+)\(", line)
            if not m:
                continue
            name, opcode = m.groups()
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = "\n".join(bodies.get(called.group(1), [])) if called else ""
            if opcode in ("dot", "convolution") or re.search(r"\s(dot|convolution)\(", body) or "custom-call" == opcode:
                kind = "matmul"
            elif opcode in ("copy", "transpose") or (opcode == "fusion" and re.search(r"\s(transpose|copy)\(", body)
                                                      and not re.search(r"\s(reduce|add|multiply)\(", body)):
                kind = "copy/transpose"
            elif opcode == "reduce" or re.search(r"\sreduce\(", body):
                kind = "reduction fusion"
            elif opcode == "fusion":
                kind = "elementwise fusion"
            else:
                kind = opcode
            kinds[name] = kind
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config_lib.load(REFERENCE, ["mesh.data=1", *args.overrides])
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    rows = SyntheticRows(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.batch_size)
    batch = stack_rows([rows[j] for j in range(cfg.train.batch_size)])
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxllm-profile-")
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(cfg, mesh)
        state, step = task.init_state(), task.train_step()
        batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
        hlo = step.lower(state, batch).compile().as_text()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        walls = []
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                start = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                walls.append(time.perf_counter() - start)
    kinds, passes = op_kinds(hlo), op_passes(hlo)
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    per_op: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in kinds:
            per_op[name] += e.get("dur", 0) / 1e3 / args.steps  # ms per step
            calls[name] += 1
    total = sum(per_op.values())
    wall = 1e3 * float(np.median(walls))
    print(f"{cfg.model.family}, {cfg.model.layers} layers, d={cfg.model.d_model}, vocab {cfg.model.vocab_size}, "
          f"{cfg.train.batch_size}x{cfg.data.seq_len} tokens, {cfg.model.compute_dtype}; "
          f"step wall {wall:.0f} ms (median of {args.steps}), op time {total:.0f} ms/step summed over threads")
    groups: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_op.items():
        groups[kinds[name]] += ms
    print(f"\n{'group':<22} {'ms/step':>9} {'share':>7}")
    for kind, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<22} {ms:9.1f} {100 * ms / total:6.1f}%")
    by_pass: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_op.items():
        by_pass[passes.get(name, "update")] += ms
    print(f"\n{'pass':<22} {'ms/step':>9} {'share':>7}")
    for part, ms in sorted(by_pass.items(), key=lambda kv: -kv[1]):
        print(f"{part:<22} {ms:9.1f} {100 * ms / total:6.1f}%")
    print(f"\n{'op':<40} {'group':<20} {'pass':<9} {'ms/step':>9} {'share':>7}")
    for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{name:<40} {kinds[name]:<20} {passes.get(name, 'update'):<9} {ms:9.1f} {100 * ms / total:6.1f}%")
    print(f"\ntrace: {path}")


if __name__ == "__main__":
    main()
