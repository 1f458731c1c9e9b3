"""Data efficiency on one token budget: baseline, curriculum, random-LTD, and both, trained in one run.

    python scripts/bench_data_efficiency.py [--steps 96] [--out runs/bench_data_efficiency] [--arms NAMES]
        [--reduced NAME=FRACTION] [--curriculum-start N] [--curriculum-fraction F] [key=value ...]

Every arm is a `jaxllm.train` run of the same GPT (default: 6 layers, d_model 256, 4 heads, seq 512,
vocab 4096, global batch 8, f32, one device) on the offline text corpus (the Python standard library's
docstrings, tokenized once before any timing), with the same peak learning rate and warm-up:

* baseline: `--steps` steps of batch x seq_len tokens; that is the token budget B;
* curriculum: `seqlen_truncate` from 128 to 512 (difficulty_step 128) over the first half of the
  baseline's steps, `curriculum.token_budget`: steps continue until B tokens, LR decays by tokens
  (`--curriculum-metric`, `--curriculum-start`, `--curriculum-fraction` change the first three);
* random-LTD: layers 1-4 of 6 keep 128 -> 512 tokens (seq_per_step 128) over 70% of the baseline's
  steps; LayerToken LR; steps continue until B layer-tokens (spec section 2);
* both: the two together (one budget, counted in layer-tokens);
* reduced budgets (`--reduced NAME=FRACTION`): a feature arm again, on that fraction of B, with its
  schedules and its learning-rate decay fitted to the smaller budget. This is how DeepSpeed states its
  savings (the baseline's quality from less data and time) and what a user who adopts the feature does.

Wall-clock is the whole `train()` call (compilations included: one per distinct length / kept length);
The persistent compilation cache is off, so every run compiles as a first run does;
"no-compile" subtracts each program's compilation (its first step less its median step), the figure a
long run approaches, where a few seconds of compiling per program vanish.
The training loop does no evaluation; each arm saves `--checkpoints` evenly spaced checkpoints (default
48, a few steps apart), and after all arms have trained they are evaluated on the same held-out batches:
a sixteenth of them for the curve, and every one around the first time the curve falls to the
baseline's final eval loss (within 1%, and exactly). That checkpoint's time, reconstructed from the
logged tokens/s of every step, is the arm's time to quality. Results go to
OUT/results.json and the comparison plot to OUT/data_efficiency.png (`jaxllm.plot.plot_runs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.data.pipeline import make_eval_batches
from jaxllm.data.sources import build_sources, token_directory
from jaxllm.data_efficiency import DataEfficiency
from jaxllm.engine.step import evaluate
from jaxllm.plot import plot_runs
from jaxllm.pretraining import LanguageModelTraining
from jaxllm.train import train

MODEL = ["model.family=gpt2", "model.layers=6", "model.d_model=256", "model.heads=4", "model.vocab_size=4096",
         "model.max_len=512", "data.source=text", "data.seq_len=512", "data.eval_fraction=0.03",
         "train.batch_size=8", "train.lr=1e-3", "mesh.data=1", "log.progress_bar=false", "log.tensorboard=false",
         "eval.every=0", "checkpoint.keep=20", "train.compile_cache=null"]


@dataclasses.dataclass(frozen=True)
class CurriculumShape:
    """The sequence-length curriculum of the curriculum arms: `metric` from `start` tokens to the full
    length, in steps of S/4, over `fraction` of the arm's baseline-equivalent steps."""

    metric: str = "seqlen_truncate"
    start: int | None = None  # None: S/4
    fraction: float = 0.5


def features(steps: int, seq_len: int, layers: int, shape: CurriculumShape = CurriculumShape()) -> dict[str, list[str]]:
    """Curriculum (`shape`, by default S/4 -> S over half of `steps`); random-LTD on every layer but the
    first and last, S/4 -> S in steps of S/4 over 70% of them. Coarse buckets keep compilations few (4 each)."""
    seqlen = f"curriculum.curriculum_metrics.{shape.metric}."
    curriculum = ["curriculum.enabled=true", "curriculum.token_budget=true", f"{seqlen}clustering_type=single_cluster",
                  f"{seqlen}min_difficulty={shape.start or seq_len // 4}", f"{seqlen}max_difficulty={seq_len}",
                  f"{seqlen}schedule_config.total_curriculum_step={max(1, int(shape.fraction * steps))}",
                  f"{seqlen}schedule_config.difficulty_step={seq_len // 4}"]
    schedule = "random_ltd.random_ltd_schedule."
    ltd = ["random_ltd.enabled=true", f"random_ltd.random_ltd_layer_id={list(range(1, layers - 1))}",
           f"{schedule}min_value={seq_len // 4}", f"{schedule}max_value={seq_len}",
           f"{schedule}schedule_config.require_steps={int(0.7 * steps)}",
           f"{schedule}schedule_config.seq_per_step={seq_len // 4}", "random_ltd.layer_token_lr_schedule.enabled=true"]
    return {"curriculum": curriculum, "random-LTD": ltd, "curriculum + random-LTD": curriculum + ltd}


def arms(steps: int, seq_len: int, layers: int, reduced: dict[str, float], shape: CurriculumShape = CurriculumShape(),
         only: set[str] | None = None) -> dict[str, tuple[int, list[str]]]:
    """Every arm as (its baseline-equivalent steps, its overrides): baseline, the three features on the
    baseline's budget (or those in `only`), and each feature named in `reduced` again on that fraction of
    the budget (its schedules and learning-rate decay scaled to the smaller budget, as a user who trains
    less would)."""
    out = {"baseline": (steps, [])}
    out.update({name: (steps, extra) for name, extra in features(steps, seq_len, layers, shape).items()
                if only is None or name in only})
    for name, fraction in reduced.items():
        short = max(1, round(fraction * steps))
        out[f"{name} @{fraction:g}"] = (short, features(short, seq_len, layers, shape)[name])
    return out


def parse_reduced(specs: list[str]) -> dict[str, float]:
    """`random-LTD=0.6` -> {"random-LTD": 0.6}; names must be feature arms."""
    known, out = features(8, 512, 6), {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        if not sep or name not in known:
            raise SystemExit(f"--reduced {spec!r}: expected NAME=FRACTION with NAME one of {sorted(known)}")
        fraction = float(value)
        if not 0 < fraction <= 1:
            raise SystemExit(f"--reduced {spec!r}: the fraction must be in (0, 1]")
        out[name] = fraction
    return out


def step_times(workdir: Path, cfg) -> tuple[dict[int, float], float]:
    """Seconds from the start of the training loop to the end of each step, from the per-step log rows,
    and the compilation time inside them: the first step of each program (one per distinct length and
    kept length) less the median step of that program."""
    elapsed, out, durations = 0.0, {}, {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "tokens_per_sec" in row:
            tokens = cfg.train.batch_size * row.get("seq_len", cfg.data.seq_len)
            elapsed += tokens / row["tokens_per_sec"]
            out[row["step"]] = elapsed
            program = (row.get("seq_len"), row.get("kept_length"))
            durations.setdefault(program, []).append(tokens / row["tokens_per_sec"])
    compile_s = sum(max(0.0, t[0] - statistics.median(t[1:])) for t in durations.values() if len(t) > 1)
    return out, compile_s


class CheckpointEvaluator:
    """Eval loss of a run's checkpoints, each computed on first request, on the same batches for every arm."""

    def __init__(self, workdir: Path, cfg, eval_batches):
        self.mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
        with jax.set_mesh(self.mesh):
            task = LanguageModelTraining.build(cfg, self.mesh)
            self.layout, self.eval_step = task.layout, task.eval_step()
        self.manager = ocp.CheckpointManager((workdir / "checkpoints").resolve())
        self.steps = sorted(int(s) for s in self.manager.all_steps())
        self.batches, self.losses = eval_batches, {}

    def __call__(self, step: int) -> float:
        if step not in self.losses:
            with jax.set_mesh(self.mesh):
                args = ocp.args.Composite(state=ocp.args.StandardRestore(self.layout.abstract))
                params = self.manager.restore(step, args=args)["state"]["params"]
                batches = [{k: jax.device_put(v) for k, v in batch.items()} for batch in self.batches]
                self.losses[step] = evaluate(self.eval_step, params, batches)["loss"]
        return self.losses[step]

    def first_below(self, target: float, coarse: int) -> int | None:
        """The first checkpoint whose eval loss is <= `target`: every `coarse`-th checkpoint (and the last)
        is evaluated until one is below, then every checkpoint since the previous coarse one. Exact for a
        curve that crosses `target` once; evaluating all checkpoints would cost minutes per arm."""
        grid = sorted({*self.steps[coarse - 1::coarse], self.steps[-1]})
        previous = 0
        for step in grid:
            if self(step) <= target:
                return next(s for s in self.steps if previous < s <= step and self(s) <= target)
            previous = step
        return None

    def close(self) -> None:
        self.manager.close()


def add_eval_rows(workdir: Path, curve: dict[int, float]) -> None:
    """Appends the checkpoints' eval losses to the run's metrics.jsonl, so the plot shows the eval curve."""
    with (workdir / "metrics.jsonl").open("a") as f:
        for step in sorted(curve):
            f.write(json.dumps({"step": step, "eval_loss": curve[step]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96, help="baseline steps (the token budget)")
    parser.add_argument("--out", default="runs/bench_data_efficiency")
    parser.add_argument("--eval-batches", type=int, default=6)
    parser.add_argument("--checkpoints", type=int, default=48,
                        help="checkpoints per arm, evenly spaced: the resolution of the time-to-quality columns "
                             "(every one is evaluated around the first crossing of each target, a sixteenth of them "
                             "elsewhere)")
    parser.add_argument("--reduced", action="append", metavar="NAME=FRACTION",
                        help="also train feature NAME on FRACTION of the baseline's budget (repeatable; default "
                             "'random-LTD=0.6' and 'curriculum + random-LTD=0.5'; 'none' for no such arm)")
    parser.add_argument("--arms", help="comma-separated feature arms on the full budget (default: all three)")
    parser.add_argument("--curriculum-metric", choices=("seqlen_truncate", "seqlen_reshape"), default="seqlen_truncate")
    parser.add_argument("--curriculum-start", type=int, help="first sequence length of the curriculum (default S/4)")
    parser.add_argument("--curriculum-fraction", type=float, default=0.5,
                        help="fraction of the arm's steps over which the curriculum reaches the full length")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every arm")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = [*MODEL, f"train.steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 12)}",
              f"data.cache_dir={out / 'data'}", *args.overrides]

    base_cfg = config_lib.load(None, common)
    shard_dir = token_directory(base_cfg, out)  # tokenize before any timing
    _, eval_rows = build_sources(base_cfg, shard_dir)
    eval_batches = make_eval_batches(eval_rows, base_cfg.train.batch_size, args.eval_batches)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; "
          f"device {jax.devices()[0].device_kind}", flush=True)

    results = {}
    reduced = args.reduced or ["random-LTD=0.6", "curriculum + random-LTD=0.5"]
    reduced = parse_reduced([] if reduced == ["none"] else reduced)
    shape = CurriculumShape(args.curriculum_metric, args.curriculum_start, args.curriculum_fraction)
    only = None
    if args.arms:
        only = {name.strip() for name in args.arms.split(",")}
        if not only <= features(8, 512, 6).keys():
            raise SystemExit(f"--arms {args.arms!r}: choose from {sorted(features(8, 512, 6))}")
    plan_arms = arms(args.steps, base_cfg.data.seq_len, base_cfg.model.layers, reduced, shape, only)
    for name, (steps, extra) in plan_arms.items():
        extra = [*extra, f"train.steps={steps}"]
        cfg = config_lib.load(None, [*common, *extra])
        plan = DataEfficiency.from_config(cfg)
        total = plan.total_steps if plan else cfg.train.steps
        every = max(1, total // args.checkpoints)
        saving = [f"checkpoint.every={every}", f"checkpoint.keep={total // every + 1}"]
        cfg = config_lib.load(None, [*common, *extra, *saving, "train.log_every=1"])
        workdir = out / name.replace(" + ", "_").replace(" @", "_at_").replace(" ", "_")
        start = time.perf_counter()
        last = train(cfg, workdir)
        wall = time.perf_counter() - start
        times, compile_s = step_times(workdir, cfg)
        tokens = sum(plan.tokens(t) for t in range(total)) if plan else total * cfg.train.batch_size * cfg.data.seq_len
        results[name] = {"workdir": str(workdir), "steps": total, "wall_s": wall, "tokens": tokens,
                         "tokens_per_sec": tokens / wall, "setup_s": wall - times[total], "times": times,
                         "compilations": last.get("train_step_compilations", 1), "compile_s": compile_s,
                         "final_train_loss": last["loss"]}
        print(f"{name}: {total} steps, {wall:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    cfg = config_lib.load(None, common)
    evaluators = {name: CheckpointEvaluator(Path(r["workdir"]), cfg, eval_batches) for name, r in results.items()}
    target = evaluators["baseline"](results["baseline"]["steps"])
    coarse = max(1, args.checkpoints // 16)
    for name, r in results.items():
        evaluate = evaluators[name]
        r["final_eval_loss"] = evaluate(r["steps"])
        for step in evaluate.steps[coarse - 1::coarse]:  # the plotted curve
            evaluate(step)
        for key, level in (("time_within_1pct_s", 1.01 * target), ("time_to_baseline_loss_s", target)):
            step = evaluate.first_below(level, coarse)
            r[key] = None if step is None else r["setup_s"] + r["times"][step]
        r["curve"] = dict(sorted(evaluate.losses.items()))
        evaluate.close()
        add_eval_rows(Path(r["workdir"]), r["curve"])
    base = results["baseline"]
    print()
    print(f"budget {base['tokens']:,} tokens; eval on {args.eval_batches} held-out batches of "
          f"{base_cfg.train.batch_size} x {base_cfg.data.seq_len}; load average after: {os.getloadavg()[0]:.2f}")
    header = (f"{'arm':<28} {'steps':>5} {'compiles':>8} {'wall s':>8} {'vs base':>7} {'no-compile':>10} "
              f"{'vs base':>7} {'tokens/s':>9} "
              f"{'eval loss':>9} {'vs base':>8} {'t(<=1.01 base) s':>17} {'t(<= base) s':>13}")
    print(header)
    for name, r in results.items():
        near, reach = r["time_within_1pct_s"], r["time_to_baseline_loss_s"]
        fmt = lambda t: f"{t:.1f} ({t / base['wall_s']:.2f}x)" if t is not None else "not reached"  # noqa: E731
        steady, base_steady = r["wall_s"] - r["compile_s"], base["wall_s"] - base["compile_s"]
        print(f"{name:<28} {r['steps']:>5} {r['compilations']:>8} {r['wall_s']:8.1f} "
              f"{r['wall_s'] / base['wall_s']:6.2f}x {steady:10.1f} {steady / base_steady:6.2f}x "
              f"{r['tokens_per_sec']:9.0f} {r['final_eval_loss']:9.4f} "
              f"{100 * (r['final_eval_loss'] / target - 1):+7.2f}% "
              f"{fmt(near):>17} {fmt(reach):>13}")
    for r in results.values():
        r["times"] = {str(k): v for k, v in r["times"].items()}
        r["curve"] = {str(k): v for k, v in r["curve"].items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    png = plot_runs([r["workdir"] for r in results.values()], out / "data_efficiency.png", list(results))
    print(f"\nplot: {png}\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
