"""Plot training runs: loss, eval loss, learning rate and tokens/s over steps, one line per run.

    python -m jaxllm.plot WORKDIR [WORKDIR ...] [--out runs.png] [--labels base,ltd]

Each WORKDIR is a `python -m jaxllm.train` workdir holding `metrics.jsonl`. The PNG has up to four
panels sharing the step axis (2 x 2), so runs compared in a benchmark (baseline vs random-LTD, AdamW
vs 1-bit Adam) are read at a glance. A series no run logged (eval loss of runs with `eval.every=0`)
gets no panel: the others are drawn side by side. `plot_runs` is the library entry point that
benchmarks call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxllm.data.jsonl import jsonl_lines
from jaxllm.errors import UserError

PANELS = (("loss", "training loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"),
          ("tokens_per_sec", "tokens/s"))


def read_metrics(workdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series name -> [(step, value)] from WORKDIR/metrics.jsonl, in file order."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics file; is '{workdir}' a jaxllm.train workdir that has logged a step?")
    series: dict[str, list[tuple[int, float]]] = {}
    for where, row in jsonl_lines(path):
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{where}: a metrics row needs a 'step' field")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    if not series:
        raise UserError(f"{path}: holds no metrics rows")
    return series


def plot_runs(workdirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Writes a PNG of the PANELS series of each run to `out` and returns its path: 2 x 2 panels when
    every series was logged, otherwise one row of the panels some run has data for."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed on a TPU VM or in CI
    import matplotlib.pyplot as plt

    labels = labels or [Path(w).resolve().name for w in workdirs]
    if len(labels) != len(workdirs):
        raise UserError(f"--labels: got {len(labels)} labels for {len(workdirs)} workdirs")
    runs = [read_metrics(w) for w in workdirs]
    panels = [(key, title) for key, title in PANELS if any(key in series for series in runs)]
    if not panels:
        raise UserError(f"{workdirs[0]}: its metrics hold none of {', '.join(key for key, _ in PANELS)}")
    shape, size = ((2, 2), (11, 7)) if len(panels) == 4 else ((1, len(panels)), (4.5 * len(panels), 3.8))
    fig, axes = plt.subplots(*shape, figsize=size, sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for label, series in zip(labels, runs, strict=True):
            if key in series:
                steps, values = zip(*series[key], strict=True)
                ax.plot(steps, values, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs holding metrics.jsonl")
    parser.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")
    parser.add_argument("--labels", help="comma-separated legend labels, one per workdir (default: names)")
    args = parser.parse_args(argv)
    try:
        out = plot_runs(args.workdirs, args.out, args.labels.split(",") if args.labels else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
