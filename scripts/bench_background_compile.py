"""Wall-clock of a curriculum + random-LTD run with `train.background_compile` off and on, alternating.

    python scripts/bench_background_compile.py [--steps 80] [--repeats 2] [--out runs/bench_background_compile]
        [--curriculum-start 256] [--curriculum-fraction 0.25] [key=value ...]

Each run is the combined arm of `scripts/bench_data_efficiency.py` (same model, data and schedules),
trained by `jaxllm.train` with the persistent compilation cache off, so every run compiles each of its
programs. Runs alternate off, on, off, on, ... in one process; the script prints each run's wall-clock
and final train loss (identical with the option on and off), and the ratio of the median wall-clocks.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data_efficiency import MODEL, CurriculumShape, features  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm.data.sources import token_directory  # noqa: E402
from jaxllm.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="baseline-equivalent steps (the token budget)")
    parser.add_argument("--repeats", type=int, default=2, help="runs with the option off, and as many on")
    parser.add_argument("--out", default="runs/bench_background_compile")
    parser.add_argument("--curriculum-start", type=int, default=256)
    parser.add_argument("--curriculum-fraction", type=float, default=0.25)
    parser.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = [*MODEL, f"train.steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 12)}",
              f"data.cache_dir={out / 'data'}", "train.log_every=1", *args.overrides]
    base = config_lib.load(None, common)
    token_directory(base, out)  # tokenize before any timing
    shape = CurriculumShape(start=args.curriculum_start, fraction=args.curriculum_fraction)
    combined = features(args.steps, base.data.seq_len, base.model.layers, shape)["curriculum + random-LTD"]

    walls: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * args.repeats):
        background = i % 2 == 1
        cfg = config_lib.load(None, [*common, *combined, f"train.background_compile={str(background).lower()}"])
        start = time.perf_counter()
        last = train(cfg, out / f"run{i}_{'on' if background else 'off'}")
        walls[background].append(time.perf_counter() - start)
        print(f"run {i + 1}: background_compile={background!s:<5} {walls[background][-1]:7.1f} s  "
              f"steps {last['step']}  programs {last.get('train_step_compilations')}  "
              f"final train loss {last['loss']:.4f}", flush=True)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"median wall-clock: off {off:.1f} s, on {on:.1f} s; on / off = {on / off:.3f}")


if __name__ == "__main__":
    main()
