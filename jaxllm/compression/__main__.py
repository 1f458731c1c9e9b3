"""`python -m jaxllm.compress ptq|lkd|xtc|eval|generate ...`: compress a trained checkpoint.

    python -m jaxllm.compress ptq --config=CFG --teacher=RUN --workdir=OUT [section.key=value ...]
    python -m jaxllm.compress lkd --config=CFG --teacher=RUN --workdir=OUT
    python -m jaxllm.compress xtc --config=CFG --teacher=RUN --workdir=OUT
    python -m jaxllm.compress eval --config=CFG --workdir=OUT
    python -m jaxllm.compress generate --workdir=OUT --prompt "text"      (python -m jaxllm.generate's flags)

`--teacher` is a training workdir (its latest checkpoint, or `--step`); the config's `compression:`
section (or a DeepSpeed JSON named by `compression.deepspeed_config`) says which modules get which
bits, and its `data:` section gives the text for calibration, LKD, XTC training and evaluation (the
teacher's tokenized shards are reused). `ptq` quantizes (ZeroQuant PTQ, static ranges calibrated on
`compression.calibration_batches` batches); `lkd` also distils each quantized block towards the
teacher's hidden states (`compression.lkd`); `xtc` trains a binary/ternary student, optionally with
fewer layers (`compression.layer_reduction`), with knowledge distillation for `train.steps` steps
(`train.*`, `optimizer.*`, `compression.kd`). Each writes a compressed checkpoint to
`OUT/checkpoints/<step>/` (`jaxllm.compression.checkpoint`) and prints the teacher's and the
compressed model's eval perplexity and weight bytes. Compression runs on one device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxllm import config as config_lib
from jaxllm.compression import checkpoint
from jaxllm.compression.pipeline import COMMANDS, compress, evaluate_workdir, load_teacher
from jaxllm.errors import UserError, exit_status
from jaxllm.generate.__main__ import main as generate_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.compress", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", help="YAML config with a compression: section (and data:, train: for xtc)")
    parser.add_argument("--teacher", help="training workdir to compress (ptq, lkd, xtc)")
    parser.add_argument("--student", help="xtc: start the student from this training workdir (default: the "
                        "teacher, reduced to compression.layer_reduction.teacher_layer)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--workdir", required=True, help="output (ptq, lkd, xtc) or compressed workdir (eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:  # jaxllm.generate's command line, which reads compressed checkpoints too
        return generate_main(argv[1:])
    args = _parser().parse_intermixed_args(argv)

    def run() -> None:
        config = config_lib.load(args.config, args.overrides)
        if args.command == "eval":
            print(json.dumps(evaluate_workdir(config, Path(args.workdir), args.step)))
            return
        if not args.teacher:
            raise UserError(f"{args.command}: --teacher WORKDIR (a training run) is required")
        if checkpoint.has_checkpoints(args.workdir):
            raise UserError(f"--workdir {args.workdir}: already holds checkpoints; write the compressed model to a new "
                            "directory")
        teacher = load_teacher(args.teacher, args.step)
        student = load_teacher(args.student, flag="--student") if args.student else None
        print(json.dumps(compress(args.command, config, teacher, Path(args.workdir), student)))

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
