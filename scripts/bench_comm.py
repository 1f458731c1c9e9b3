"""Communication volume, rounds and final loss of AdamW, 1-bit Adam and 0/1 Adam, measured in one run.

    python scripts/bench_comm.py [--steps 200] [--devices 8] [--workdir DIR] [--json out.json] [--optimizers NAMES]
                                 [key=value ...]

Trains the quickstart model (configs/quickstart.yaml: GPT-2, 4 layers, d_model 192, on the Python
standard library's docstrings) for the same number of steps with each optimizer on 8 devices
(mesh.data=8; on a CPU-only machine 8 fake host devices), then reads the compiled HLO of every step
program (one per optimizer phase) and adds up what crosses the data axis:

  bytes/step   per device, for each collective of the program: all-reduce 2 S (W-1)/W (ring),
               all-gather and all-to-all S (W-1)/W of the result size S (`hlo_collectives`)
  rounds       steps whose program has any collective over the data axis
  volume       bytes summed over the steps of the run, each step counted with its phase's program

The final eval loss (after the last step, on the held-out split) compares the optimizers. Logging
reductions (every step here, which also keeps the host from queueing many steps: XLA's CPU
collectives have been seen to hang with deep queues on an overloaded 2-core machine) and evaluation
are separate programs and are not counted. Phase settings for the short run are flags; the defaults
freeze 1-bit Adam after 15% of the steps and give 0/1 Adam the same variance phase (DeepSpeed's
var_update_scaler 16), then local intervals doubling every 8 steps up to 4 steps.

`--devices 1` runs the same optimizers on one device (mesh.data=1): nothing is compressed and 0/1
Adam takes no local steps that differ from synchronous ones, so what is left of a loss gap there comes
from the frozen variance and the phase schedule alone.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--devices", type=int, default=8,
                        help="size of the data axis (fake host devices on a CPU); 1 compresses nothing")
    parser.add_argument("--workdir", default="runs/bench_comm")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--freeze-fraction", type=float, default=0.15,
                        help="1-bit Adam freeze_step and 0/1 Adam var_freeze_step, as a fraction of --steps")
    parser.add_argument("--var-update-scaler", type=int, default=16, help="0/1 Adam (DeepSpeed's default)")
    parser.add_argument("--local-step-scaler", type=int, default=8, help="0/1 Adam (DeepSpeed: 32678)")
    parser.add_argument("--local-step-clipper", type=int, default=4, help="0/1 Adam (DeepSpeed: 16)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="optimizer.bias_correction for 1-bit and 0/1 Adam (AdamW always corrects)")
    parser.add_argument("--exact-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="optimizer.exact_allreduce_dtype for the 1-bit optimizers (AdamW's stays f32)")
    parser.add_argument("--optimizers", default="onebit_adam,zero_one_adam",
                        help="comma-separated 1-bit optimizers to run beside AdamW (the baseline, always run)")
    parser.add_argument("overrides", nargs="*")
    return parser


# Parsed before JAX starts: --devices fixes the number of fake host devices. The fake devices are
# threads that meet in every collective; on a busy CPU one can be starved past XLA's 40 s rendezvous
# limit, so the limit is raised.
ARGS = _parser().parse_args()
if ARGS.devices < 1:
    raise SystemExit(f"--devices {ARGS.devices}: needs at least 1")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    f"--xla_force_host_platform_device_count={ARGS.devices}",
                                    "--xla_cpu_collective_call_terminate_timeout_seconds=1200"]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import mesh as mesh_lib  # noqa: E402
from jaxllm.engine.onebit import hlo_collectives  # noqa: E402
from jaxllm.pretraining import LanguageModelTraining  # noqa: E402
from jaxllm.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def phase_traffic(text: str, devices: int) -> dict:
    found = hlo_collectives(text)
    return {"bytes": sum(c.traffic(devices) for c in found),
            "collectives": sorted(f"{c.kind} {'/'.join(c.dtypes)}[{c.elements}]" for c in found)}


def programs(config) -> tuple[list[str], list[int], dict[int, dict]]:
    """Phase names, the phase of every step, and each phase's traffic (from its compiled HLO)."""
    mesh = mesh_lib.make_mesh(config.mesh)
    rows, length = config.train.batch_size, config.data.seq_len
    with jax.set_mesh(mesh):
        batch = {k: jax.ShapeDtypeStruct((rows, length), np.float32 if k == "loss_mask" else np.int32,
                                         sharding=mesh_lib.batch_sharding(mesh))
                 for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
        task = LanguageModelTraining.build(config, mesh)
        step, training = task.train_step(), task.optimizer.onebit
        if training is None:  # AdamW: one program, GSPMD's f32 all-reduce of the gradient
            text = step.lower(task.layout.abstract, batch).compile().as_text()
            return ["exact"], [0] * config.train.steps, {0: phase_traffic(text, mesh.devices.size)}
        phases = [training.plan.phase(t) for t in range(1, config.train.steps + 1)]
        traffic = {p: phase_traffic(step.program(p).lower(task.layout.abstract, batch).compile().as_text(),
                                    mesh.devices.size) for p in sorted(set(phases))}
        return list(training.plan.names), phases, traffic


def main() -> None:
    args = ARGS
    workdir = Path(args.workdir).resolve()
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    freeze = max(2, round(args.freeze_fraction * args.steps))
    common = [f"train.steps={args.steps}", f"mesh.data={args.devices}", f"eval.every={args.steps}", "train.log_every=1",
              "checkpoint.every=0", "log.progress_bar=false", "log.tensorboard=false",
              f"data.cache_dir={workdir / 'data'}", *args.overrides]
    runs = {
        "adamw": ["optimizer.name=adamw"],
        "onebit_adam": ["optimizer.name=onebit_adam", f"optimizer.freeze_step={freeze}"],
        "zero_one_adam": ["optimizer.name=zero_one_adam", f"optimizer.var_freeze_step={freeze}",
                          f"optimizer.var_update_scaler={args.var_update_scaler}",
                          f"optimizer.local_step_scaler={args.local_step_scaler}",
                          f"optimizer.local_step_clipper={args.local_step_clipper}"],
    }
    compressed_only = ((["optimizer.bias_correction=true"] if args.bias_correction else [])
                       + [f"optimizer.exact_allreduce_dtype={args.exact_dtype}"])
    runs = {name: extra + ([] if name == "adamw" else compressed_only) for name, extra in runs.items()}
    wanted = {name.strip() for name in args.optimizers.split(",") if name.strip()}
    if not wanted <= runs.keys() - {"adamw"}:
        raise SystemExit(f"--optimizers {args.optimizers!r}: choose from onebit_adam, zero_one_adam")
    runs = {name: extra for name, extra in runs.items() if name == "adamw" or name in wanted}
    results = {}
    for name, extra in runs.items():
        config = config_lib.load(REPO / "configs/quickstart.yaml", [*common, *extra])
        run_dir = workdir / name
        if run_dir.exists():  # start fresh: the benchmark measures whole runs
            import shutil

            shutil.rmtree(run_dir)
        last = train(config, run_dir)
        names, phases, traffic = programs(config)
        counts = {p: phases.count(p) for p in traffic}
        volume = sum(traffic[p]["bytes"] for p in phases)
        rounds = sum(1 for p in phases if traffic[p]["bytes"] > 0)
        results[name] = {
            "overrides": extra, "eval_loss": last["eval_loss"], "volume_bytes": volume, "rounds": rounds,
            "phases": {names[p]: {"steps": counts[p], **traffic[p]} for p in traffic},
        }
        if name == "zero_one_adam":
            syncs = [t for t, p in enumerate(phases, start=1) if traffic[p]["bytes"] > 0]
            if syncs:
                results[name]["steps_since_last_sync"] = args.steps - syncs[-1]

    base = results["adamw"]
    base_step = base["phases"]["exact"]["bytes"]
    axes = {axis: getattr(config.mesh, axis) for axis in ("data", "fsdp", "tensor", "sequence")}
    mesh_text = " ".join(f"{axis}={size}" for axis, size in axes.items() if size != 1 or axis == "data")
    print(f"quickstart model, {args.steps} steps, mesh {mesh_text} ({jax.devices()[0].platform}); "
          f"freeze/var_freeze_step {freeze}, var_update_scaler {args.var_update_scaler}, "
          f"local_step_scaler {args.local_step_scaler}, local_step_clipper {args.local_step_clipper}, "
          f"bias correction {'on' if args.bias_correction else 'off (DeepSpeed)'}, "
          f"exact averages in {args.exact_dtype}")
    data_only = all(size == 1 for axis, size in axes.items() if axis != "data")
    if not data_only:
        print("other mesh axes > 1: bytes and rounds below count every collective of a step (parameter "
              "all-gathers too), each as if over all devices; only the eval losses compare with a data-only mesh")
    print(f"{'optimizer':<14} {'phase':<20} {'steps':>5} {'MB/step':>9} {'vs AdamW':>9}  "
          + ("collectives over the data axis" if data_only else "collectives"))
    for name, r in results.items():
        for phase, p in r["phases"].items():
            ratio = f"{base_step / p['bytes']:.1f}x" if p["bytes"] else "none"
            kinds = ", ".join(sorted(set(c.split("[")[0] for c in p["collectives"]))) or "-"
            print(f"{name:<14} {phase:<20} {p['steps']:>5} {p['bytes'] / 1e6:9.4f} {ratio:>9}  {kinds}")
    print(f"\n{'optimizer':<14} {'volume MB':>10} {'vs AdamW':>9} {'rounds':>7} {'vs AdamW':>9} {'eval loss':>10} "
          f"{'vs AdamW':>9}")

    def saving(value: float, baseline: float) -> str:  # one device communicates nothing at all
        return f"{1 - value / baseline:9.1%}" if baseline else f"{'-':>9}"

    for name, r in results.items():
        print(f"{name:<14} {r['volume_bytes'] / 1e6:10.2f} {saving(r['volume_bytes'], base['volume_bytes'])} "
              f"{r['rounds']:>7} {saving(r['rounds'], base['rounds'])} {r['eval_loss']:10.4f} "
              f"{r['eval_loss'] / base['eval_loss'] - 1:+9.2%}")
    if "steps_since_last_sync" in results.get("zero_one_adam", {}):
        print(f"0/1 Adam: the last sync was {results['zero_one_adam']['steps_since_last_sync']} step(s) before the "
              "end; its eval uses the synchronised parameters")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "freeze_step": freeze, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
