"""ZeroQuant and XTC on the quickstart model: eval perplexity, weight bytes and CPU generation speed, in one run.

    python scripts/bench_compression.py [--workdir runs/bench_compression] [--steps 150] [--xtc-steps 60]
                                        [--lkd-steps 100] [--json out.json]

Trains the quickstart recipe (`configs/quickstart.yaml`: GPT-2, 4 layers, d_model 192, vocabulary 4096,
the standard library's docstrings), shortened to `--steps` steps, as the f32 teacher (a finished run in
`WORKDIR/teacher` is reused), then compresses it six ways and measures every model the same way:

| variant          | weights                                            | activations | how            |
|------------------|----------------------------------------------------|-------------|----------------|
| f32              | f32                                                | f32         | the teacher    |
| W8A8             | int8 everywhere (64 groups; embedding: 1 per row)  | int8 tokens | PTQ            |
| W4/8-A8          | int4 MLP, int8 attention and embedding             | int8 tokens | PTQ            |
| W4/8-A8 + LKD    | as above, each block distilled to the teacher      | int8 tokens | LKD, then PTQ  |
| ternary XTC      | ternary blocks and embedding (1 group)             | int8 tokens | KD training    |
| XTC, 2 of 4 layers | as above, student keeps teacher blocks 1 and 3   | int8 tokens | KD training    |

Eval perplexity: the held-out rows (`eval.batches` batches). Weight bytes: every array of the params
tree (codes, scales, zero points, the f32 norms, biases and positions). Generation: greedy
`jaxllm.generate.generate` on one CPU device, `--gen-batch` prompts of 16 tokens, `--new-tokens`
new tokens each, tokens/s after a compiling warm-up: the median of `--repeats` rounds, each round
timing every variant once in turn (so a change in the machine's load slows all of them alike). On
CPU the quantized matmuls dequantize in XLA (the Pallas kernel is the GPU/TPU path), so this
measures the cost of integer storage, not an integer-arithmetic speed-up. The table and a JSON file
give the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import train
from jaxllm.compression import model as cmodel
from jaxllm.compression import pipeline, xtc, zeroquant
from jaxllm.compression import rules as rules_lib
from jaxllm.compression.qtensor import QuantizedWeight, is_compressed
from jaxllm.generate import generate
from jaxllm.models.definition import ModelDef

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"

ATTN, MLP, EMBED = r"attn\.w[qkvo]$", r"mlp\.w_(in|out)$", r"^embed$"


def recipes() -> dict[str, list[rules_lib.Rule]]:
    act = rules_lib.Rule((ATTN, MLP), act_bits=8, name="a8")
    return {
        "W8A8": [rules_lib.Rule((ATTN, MLP), weight_bits=8, weight_groups=64, name="w8"),
                 rules_lib.Rule((EMBED,), weight_bits=8, name="embed"), act],
        "W4/8-A8": [rules_lib.Rule((ATTN,), weight_bits=8, weight_groups=64, name="attn"),
                    rules_lib.Rule((MLP,), weight_bits=4, weight_groups=64, name="mlp"),
                    rules_lib.Rule((EMBED,), weight_bits=8, name="embed"), act],
        "ternary": [rules_lib.Rule((ATTN, MLP, EMBED), weight_bits=2, weight_groups=1, name="w2"), act],
    }


def train_teacher(workdir: Path, steps: int):
    overrides = [f"train.steps={steps}", f"eval.every={steps}", "checkpoint.every=0", "log.progress_bar=false",
                 "log.tensorboard=false"]
    config = config_lib.load(QUICKSTART, overrides)
    started = time.perf_counter()
    train.train(config, workdir)
    return config, overrides, time.perf_counter() - started


def matrix_ratios(tree: dict, specs) -> dict[int, float]:
    """f32 bytes / stored bytes of the quantized matrices, by weight bits."""
    totals: dict[int, list[int]] = {}
    for name, spec in specs.items():
        w = cmodel.get_path(tree, cmodel.module_path(name))
        if isinstance(w, QuantizedWeight):
            f32 = int(np.prod(w.shape)) * 4
            t = totals.setdefault(spec.weight_bits, [0, 0])
            t[0], t[1] = t[0] + f32, t[1] + w.nbytes()
    return {bits: f32 / stored for bits, (f32, stored) in sorted(totals.items())}


def generation_speed(models: list, prompts, new_tokens: int, repeats: int) -> list[float]:
    """Tokens/s of each model: compile all, then `repeats` rounds timing each model once in turn."""
    for model in models:
        generate(model, prompts, max_new_tokens=new_tokens)
    times: list[list[float]] = [[] for _ in models]
    counts = [0] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            start = time.perf_counter()
            out = generate(model, prompts, max_new_tokens=new_tokens)
            times[i].append(time.perf_counter() - start)
            counts[i] = sum(len(o) for o in out)
    return [n / statistics.median(t) for n, t in zip(counts, times, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/bench_compression")
    parser.add_argument("--steps", type=int, default=150, help="teacher training steps (the quickstart's 150)")
    parser.add_argument("--xtc-steps", type=int, default=60)
    parser.add_argument("--xtc-lr", type=float, default=1e-3)
    parser.add_argument("--lkd-steps", type=int, default=100)
    parser.add_argument("--lkd-lr", type=float, default=1e-4)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here (default: WORKDIR/results.json)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    bench_start = time.perf_counter()

    config, overrides, train_seconds = train_teacher(workdir / "teacher", args.steps)
    teacher = pipeline.load_teacher(workdir / "teacher")
    config = dataclasses.replace(config, model=teacher.model_def.bind(teacher.params).cfg)
    data = pipeline.Data(config, workdir / "teacher")
    eval_batches = data.eval_batches()
    calibration = data.train_batches(config.compression.calibration_batches)
    prompts = [[int(t) for t in row[:16]] for row in eval_batches[0]["inputs"][: args.gen_batch]]
    cfg, md = config.model, teacher.model_def
    shapes = rules_lib.module_shapes(md.shapes, cfg)
    recipe = recipes()
    results, models = [], []

    def measure(name, model_def, tree, specs, seconds, note):
        row = {"variant": name, **cmodel.evaluate(model_def, tree, eval_batches),
               "weight_bytes": cmodel.weight_bytes(tree), "compress_seconds": seconds,
               "matrix_ratio": matrix_ratios(tree, specs) if specs else {}, "note": note}
        results.append(row)
        models.append(model_def.bind(tree))
        print(f"{name}: eval ppl {row['eval_perplexity']:.3f}, {row['weight_bytes']:,} bytes", flush=True)

    measure("f32", md, teacher.params, {}, 0.0, f"teacher, {args.steps} steps")
    for name in ("W8A8", "W4/8-A8"):
        specs = rules_lib.plan(cfg, recipe[name], shapes)
        start = time.perf_counter()
        tree, _ = zeroquant.ptq(md, teacher.params, specs, calibration)
        measure(name, md, tree, specs, time.perf_counter() - start, "PTQ, A8 dynamic per token")

    specs = rules_lib.plan(cfg, recipe["W4/8-A8"], shapes)
    start = time.perf_counter()
    lkd_batches = data.train_batches(config.compression.lkd.batches)
    student, report = zeroquant.lkd(md, teacher.params, teacher.params, specs, lkd_batches, steps=args.lkd_steps,
                                    learning_rate=args.lkd_lr, log=print)
    tree, _ = zeroquant.ptq(md, student, specs, calibration)
    ratios = ", ".join(f"{b:.3g}->{a:.3g}" for b, a in zip(report.before, report.after, strict=True))
    measure("W4/8-A8 + LKD", md, tree, specs, time.perf_counter() - start,
            f"LKD {args.lkd_steps} steps/block, lr {args.lkd_lr}; block MSE {ratios}")

    xtc_config = config_lib.load(QUICKSTART, overrides + [f"train.steps={args.xtc_steps}", f"train.lr={args.xtc_lr}",
                                                          "train.warmup_steps=5", "train.log_every=20",
                                                          "log.progress_bar=false", "log.tensorboard=false"])
    for name, kept in (("ternary XTC", None), ("XTC, 2 of 4 layers", (1, 3))):
        student, scfg = (teacher.params, cfg) if kept is None else cmodel.reduce_layers(teacher.params, cfg, kept)
        sdef = ModelDef.from_config(scfg)
        specs = rules_lib.plan(scfg, recipe["ternary"], rules_lib.module_shapes(sdef.shapes, scfg))
        start = time.perf_counter()
        run = workdir / ("xtc" if kept is None else "xtc_reduced")
        shutil.rmtree(run, ignore_errors=True)  # a fresh distillation, not a resumed one
        result = xtc.train_student(xtc_config, run, md, teacher.params, sdef, student, specs, data.train_iterator(),
                                   xtc.layer_maps(cfg.layers, scfg.layers, kept))
        tree = cmodel.store_params(result.student, specs, result.ranges)
        keeps = "all 4 blocks" if kept is None else f"teacher blocks {list(kept)} as its 2 blocks"
        measure(name, sdef, tree, specs, time.perf_counter() - start,
                f"KD {args.xtc_steps} steps, lr {args.xtc_lr}; keeps {keeps}, ternary weights and embedding")

    for row, speed in zip(results, generation_speed(models, prompts, args.new_tokens, args.repeats), strict=True):
        row["tokens_per_sec"] = speed
    base = results[0]
    header = (f"{'variant':<20} {'eval ppl':>9} {'vs f32':>7} {'weight bytes':>13} {'smaller':>8} "
              f"{'int8 / int4 / 2-bit':>20} {'gen tok/s':>9} {'vs f32':>7}")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = " / ".join(f"{r['matrix_ratio'][b]:.2f}x" if b in r["matrix_ratio"] else "-" for b in (8, 4, 2))
        print(f"{r['variant']:<20} {r['eval_perplexity']:>9.3f} {r['eval_perplexity'] / base['eval_perplexity']:>7.3f} "
              f"{r['weight_bytes']:>13,} {base['weight_bytes'] / r['weight_bytes']:>7.2f}x {ratio:>20} "
              f"{r['tokens_per_sec']:>9.0f} {r['tokens_per_sec'] / base['tokens_per_sec']:>7.2f}")
    print()
    for r in results:
        print(f"{r['variant']}: {r['note']} ({r['compress_seconds']:.1f} s)")
    total = time.perf_counter() - bench_start
    print(f"\nteacher training {train_seconds:.0f} s; whole benchmark {total:.0f} s on {jax.devices()[0].platform}")
    out = Path(args.json) if args.json else workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "train_seconds": train_seconds,
                               "total_seconds": total}, indent=1))
    assert all(not is_compressed(x) for x in jax.tree.leaves(teacher.params))


if __name__ == "__main__":
    main()
