"""The command line every training command shares: `--config`, `--workdir` and `section.key=value`
overrides, checked before anything starts."""

from __future__ import annotations

import argparse


def run_parser(prog: str, description: str, workdir_default: str | None,
               workdir_help: str = "metrics, TensorBoard and checkpoints go here") -> argparse.ArgumentParser:
    """A parser with `--config` and `--workdir`; add the command's own arguments, then `parse_run_args`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (defaults apply without one)")
    parser.add_argument("--workdir", default=workdir_default, help=workdir_help)
    return parser


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses `argv` (options and overrides in any order); an override without `=` is a usage error."""
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"expected section.key=value overrides, got {bad[0]!r}")
    return args
