"""`python -m jaxllm.rlhf sft|reward|ppo --config=PATH [--workdir=DIR] [section.key=value ...]`

DeepSpeed-Chat's three steps: supervised fine-tuning, reward model, PPO. Each writes
`DIR/metrics.jsonl`, TensorBoard events and checkpoints like `python -m jaxllm.train`, and rerunning
the same command resumes from the newest checkpoint. Mistakes print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxllm import runtime
from jaxllm.command_line import parse_run_args, run_parser
from jaxllm.errors import exit_status
from jaxllm.rlhf import config as config_lib
from jaxllm.rlhf.config import STAGES


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = run_parser("python -m jaxllm.rlhf", __doc__.splitlines()[0], None,
                        "metrics, TensorBoard and checkpoints go here (default runs/rlhf/STAGE)")
    parser.add_argument("stage", choices=STAGES, help="sft (step 1), reward (step 2) or ppo (step 3)")
    return parse_run_args(parser, argv)


def run(stage: str, config: config_lib.RLHFConfig, workdir: Path) -> dict:
    """Runs one step in-process, holding its workdir; returns its last logged metrics row."""
    from jaxllm.rlhf import ppo, reward, sft

    with runtime.workdir_lock(workdir):
        return {"sft": sft.run, "reward": reward.run, "ppo": ppo.run}[stage](config, workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path(args.workdir or f"runs/rlhf/{args.stage}")
    return exit_status(lambda: run(args.stage, config_lib.load(args.config, args.overrides), workdir))


if __name__ == "__main__":
    sys.exit(main())
