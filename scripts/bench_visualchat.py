"""The VisualChat proof on CPU: train a tiny model on the synthetic visual QA task, twice (MMCA and plain
causal attention), and compare held-out answer accuracy with chance and the best text-only answers.

    python scripts/bench_visualchat.py [--config configs/visualchat/tiny.yaml] [--workdir runs/bench_visualchat]
                                       [section.key=value ...]

Both runs use the same config, data, tokenizer, seed and steps (`python -m jaxllm.multimodal.train`'s
own `train`); only `multimodal.attention` differs. Accuracy is exact match of the greedy answer to each
held-out conversation's question (`jaxllm.multimodal.train.evaluate_accuracy`). The text-only baseline
answers each held-out question with the most frequent training answer of the same question text
(`jaxllm.multimodal.synthetic.text_baseline`), the best a model that ignores the images can do on
this data. Prints a table and writes the numbers to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxllm.multimodal import synthetic
from jaxllm.multimodal import train as train_lib
from jaxllm.multimodal.config import load
from jaxllm.multimodal.data import read_conversations

GROUPS = {"single_count": "one image: how many X?", "pair_more": "two images: which has more X?"}


def accuracy_table(held_out, train, runs: dict[str, dict]) -> list[tuple[str, int, float, float, dict]]:
    """Rows (label, n, chance, text-only, {run: accuracy}) per question group, per kind and overall.

    `runs[name]` maps each category to a list of per-question correctness flags."""
    baseline_hits = synthetic.text_baseline_hits(train, held_out)
    answers: dict[str, set] = {}
    for conv in train:
        answers.setdefault(conv.category, set()).add(conv.turns[-1].answer)
    categories = sorted(baseline_hits)

    def row(label, cats):
        n = sum(len(baseline_hits[c]) for c in cats)
        chance = sum(len(baseline_hits[c]) / len(answers[c]) for c in cats) / n
        text = sum(sum(baseline_hits[c]) for c in cats) / n
        acc = {name: sum(sum(hits[c]) for c in cats) / n for name, hits in runs.items()}
        return label, n, chance, text, acc

    rows = []
    for group, label in GROUPS.items():
        cats = [c for c in categories if c.split("/")[0] == group]
        rows.append(row(label, cats))
        rows += [row(f"  {c.split('/', 1)[1]}", [c]) for c in cats if "/" in c]
    rows.append(row("all", categories))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/visualchat/tiny.yaml")
    parser.add_argument("--workdir", default="runs/bench_visualchat")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for both runs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path(args.workdir)
    results: dict[str, dict] = {}
    for attention in ("mmca", "causal"):
        config = load(args.config, [*args.overrides, f"multimodal.attention={attention}",
                                    "log.progress_bar=false"])
        run_dir = workdir / attention
        start = time.perf_counter()
        last = train_lib.train(config, run_dir)  # resumes (or just reloads) a run already in the workdir
        seconds = time.perf_counter() - start
        if not last:  # the run was complete: its last logged row
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        results[attention] = {"seconds": seconds, "final_loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
                              "steps": config.train.steps}
        print(f"{attention}: {config.train.steps} steps in {seconds:.0f} s, eval_loss {last.get('eval_loss'):.4f}",
              file=sys.stderr)

    data_dir = workdir / "mmca" / "data" / "synthetic"
    train = read_conversations(data_dir / "train_single.jsonl") + read_conversations(data_dir / "train_pair.jsonl")
    held_out = read_conversations(data_dir / "eval.jsonl")
    hits = {}
    for attention in ("mmca", "causal"):
        hits[attention] = {}
        for line in (workdir / attention / "eval_answers.jsonl").read_text().splitlines():
            record = json.loads(line)
            hits[attention].setdefault(record["category"], []).append(record["correct"])
    table = accuracy_table(held_out, train, hits)
    header = (f"| {'held-out questions':<32} | {'n':>4} | {'chance':>6} | {'text-only':>9} | {'MMCA':>6} | "
              f"{'causal':>6} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for label, n, chance, text, acc in table:
        print(f"| {label:<32} | {n:>4} | {chance:>6.3f} | {text:>9.3f} | {acc['mmca']:>6.3f} | {acc['causal']:>6.3f} |")
    for attention in ("mmca", "causal"):
        r = results[attention]
        print(f"{attention}: {r['steps']} steps, {r['seconds']:.0f} s, final train loss {r['final_loss']:.4f}, "
              f"held-out answer loss {r['eval_loss']:.4f}")
    out = {"runs": results, "table": [{"questions": label.strip(), "n": n, "chance": chance, "text_only": text,
                                       **acc} for label, n, chance, text, acc in table],
           "command": " ".join(["python", "scripts/bench_visualchat.py", *sys.argv[1:]])}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
