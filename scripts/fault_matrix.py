"""Damages every file of a checkpoint in four ways, kills runs at chosen moments, and tabulates what
resuming does. The table of docs/reliability.md.

    python scripts/fault_matrix.py [--workdir runs/fault_matrix] [--modes truncate,zero,delete,flip]

A tiny `python -m jaxllm.train` run saves checkpoints 2 and 4 (of 6 steps). For each file of
checkpoint 4 and each damage (truncate to half, zero-fill, delete, flip 8 bytes in the middle), a
copy of the run is damaged and resumed to step 6, and the outcome classified against a run that was
never stopped:

  resumed    the run finished with bitwise the losses of the uninterrupted run
  error      it stopped with one clear line (exit status 2)
  traceback  it stopped with a traceback (must be 0)
  wrong      it finished with other losses (must be 0)
  lost       checkpoint 2, which was intact, is gone or changed (must be 0)

The kill cases run the command in a child process killed with SIGKILL after a step, and during a
save, then resume it.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.vocab_size=128", "model.max_len=32",
        "data.seq_len=16", "data.synthetic_rows=256", "train.batch_size=8", "train.warmup_steps=2",
        "train.min_lr_ratio=1.0", "train.log_every=1", "checkpoint.every=2", "checkpoint.async_save=false",
        "log.progress_bar=false", "log.tensorboard=false", "mesh.data=1"]
MODES = ("truncate", "zero", "delete", "flip")


def run(workdir: Path, steps: int, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("JAXLLM_FAULT", None)
    if fault:
        env["JAXLLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "jaxllm.train", f"--workdir={workdir}", *TINY,
                           f"train.steps={steps}"], capture_output=True, text=True, env=env, cwd=REPO)


def losses(workdir: Path) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return h.hexdigest()


def damage(path: Path, mode: str) -> None:
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif mode == "zero":
        path.write_bytes(bytes(len(data)))
    elif mode == "delete":
        path.unlink()
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])


def classify(result: subprocess.CompletedProcess, workdir: Path, want: dict, intact: str) -> str:
    if not (workdir / "checkpoints" / "2").is_dir() or digest(workdir / "checkpoints" / "2") != intact:
        return "lost"
    if result.returncode == 0:
        return "resumed" if losses(workdir) == want else "wrong"
    if result.returncode == 2 and "Traceback" not in result.stderr:
        return "error"
    return "traceback"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/fault_matrix")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    root = Path(args.workdir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    straight, base = root / "straight", root / "base"
    for workdir, steps in ((straight, 6), (base, 4)):
        result = run(workdir, steps)
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
    want = losses(straight)
    intact = digest(base / "checkpoints" / "2")
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    examples: dict[str, str] = {}
    files = sorted(p.relative_to(base / "checkpoints" / "4") for p in (base / "checkpoints" / "4").rglob("*")
                   if p.is_file())
    for mode in args.modes.split(","):
        for name in files:
            case = root / "case"
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(base, case)
            damage(case / "checkpoints" / "4" / name, mode)
            outcome = classify(run(case, 6), case, want, intact)
            outcomes[mode][outcome] += 1
            examples.setdefault(outcome, f"{mode} {name}")
            print(f"{mode:8} {str(name):60} {outcome}", flush=True)
    for fault in ("kill_after_step:3", "kill_in_save:4"):
        case = root / "case"
        shutil.rmtree(case, ignore_errors=True)
        run(case, 6, fault)  # killed: checkpoint 2 is complete by then
        intact_here = digest(case / "checkpoints" / "2")
        outcome = classify(run(case, 6), case, want, intact_here)
        outcomes["kill"][outcome] += 1
        print(f"{fault:69} {outcome}", flush=True)
    kinds = ("resumed", "error", "traceback", "wrong", "lost")
    print(f"\n| damage | cases | {' | '.join(kinds)} |\n|---|---:|" + "---:|" * len(kinds))
    for mode, counts in outcomes.items():
        print(f"| {mode} | {sum(counts.values())} | " + " | ".join(str(counts[k]) for k in kinds) + " |")
    total = collections.Counter()
    for counts in outcomes.values():
        total.update(counts)
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[k]) for k in kinds) + " |")
    for outcome, example in examples.items():
        print(f"first {outcome}: {example}")


if __name__ == "__main__":
    main()
