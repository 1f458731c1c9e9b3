"""`--dry-run`'s memory estimate against the compiler's per-device total, for the recipes of aot_table.py.

    python scripts/dry_run_check.py [--only NAME ...] [--no-compile] [--json runs/dry_run_check.json]

Each recipe (preset, target, overrides: `RECIPES` in scripts/aot_table.py) is compiled in a process of
its own by `python -m jaxllm.aot` (minutes for the large ones; the TPU and GPU compilers come with the
aot extras); the estimate's terms (`jaxllm.memory.estimate`) come from the same config laid out on the
target's abstract devices, which takes seconds. `--no-compile` prints the terms alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the targets' compilers must not look for local devices
sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_table import RECIPES, REPO, compile_recipe  # noqa: E402

GIB = 2**30
TOLERANCE = 0.15


def estimate_terms(config_path: str, target: str, overrides: list[str]) -> dict[str, int]:
    """`jaxllm.memory.estimate` of a recipe on the target's abstract devices (nothing is compiled)."""
    import jax

    from jaxllm import config as config_lib
    from jaxllm import memory
    from jaxllm import mesh as mesh_lib
    from jaxllm.aot import Target
    from jaxllm.pretraining import LanguageModelTraining

    config = config_lib.load(str(REPO / config_path), overrides)
    mesh = mesh_lib.make_mesh(config.mesh, Target.parse(target).devices())
    with jax.set_mesh(mesh):
        layout = LanguageModelTraining.build(config, mesh).layout
    return memory.estimate(config, layout, dict(mesh.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="print the estimate's terms only")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args()
    names = args.only or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"--only {unknown}: not in RECIPES; expected some of {list(RECIPES)}")
    print("| recipe | target | compiler GiB/device | estimate GiB | estimate / compiler | terms (GiB) |")
    print("|---|---|---:|---:|---:|---|")
    rows = {}
    for name in names:
        path, target, overrides = RECIPES[name]
        terms = estimate_terms(path, target, overrides)
        row = {"target": target, "terms": terms, "estimate": terms["total"]}
        compiled = "-"
        ratio = "-"
        if not args.no_compile:
            report = compile_recipe(path, target, overrides)
            # A refused program has no total: its state and batch plus the temporaries the compiler asked for.
            needed = report["parameters"] + report["optimizer_state"] + report["batch"] + report["temporaries"]
            total = needed if report["error"] else report["total"]
            row |= {"compiler": total, "refused": bool(report["error"])}
            compiled = f"{total / GIB:.2f}" + (" (refused)" if report["error"] else "")
            ratio = f"{terms['total'] / total:.2f}" + ("" if abs(terms["total"] / total - 1) <= TOLERANCE else " !")
        shown = ", ".join(f"{k} {v / GIB:.2f}" for k, v in terms.items() if k != "total" and v)
        print(f"| {name.strip()} | {target} | {compiled} | {terms['total'] / GIB:.2f} | {ratio} | {shown} |",
              flush=True)
        rows[name] = row
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
