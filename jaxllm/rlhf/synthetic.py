"""A small preference task whose correct behaviour a rule can check: use the requested word, not the
forbidden one.

A prompt names two of 16 words, e.g. ``"say cat but never dog:"`` (four templates); an answer is three
words. The rule (`rule_score`): an answer scores 1 when it contains the requested word (the first
task word of the prompt) and not the forbidden one (the second), else 0.

Each row carries, in DeepSpeed-Chat's keys:

- ``response``: what a mediocre demonstrator wrote, the step-1 target. It is helpful (a correct
  answer) with probability 0.35, lazy (``"i do not know"``) with 0.45, and wrong (three words without
  the requested one, half of the time including the forbidden one) with 0.2. A model that imitates
  it answers correctly about a third of the time when sampling and, greedily, says "i do not know".
- ``chosen``: a fresh correct answer; ``rejected``: a lazy (0.4) or wrong (0.6) answer.

So step 2 can learn the rule from the pairs (the reward model must find the requested word in the
prompt and check the answer for both words), and step 3 can lift the greedy answers from lazy to
correct, which `rule_score` measures without any model.

``python -m jaxllm.rlhf.synthetic --out DIR [--rows 4000] [--eval-rows 1000] [--seed 0]`` writes
``DIR/train.jsonl`` and ``DIR/eval.jsonl``; the commands do the same into ``WORKDIR/data/`` when
``data.source: synthetic``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

WORDS = ("red", "blue", "green", "gold", "cat", "dog", "fish", "bird", "sun", "moon", "star", "rain", "tree",
         "rock", "milk", "bread")
TEMPLATES = ("use {w} not {v}:", "say {w} but never {v}:", "include {w} and avoid {v}:", "reply with {w}, without {v}:")
LAZY = "i do not know"
ANSWER_WORDS = 3
P_HELPFUL, P_LAZY = 0.35, 0.45  # the demonstrator's mixture; the rest is wrong
P_REJECTED_LAZY = 0.4


def _words(text: str) -> list[str]:
    return [w.strip(",:.") for w in text.split()]


def task_words(prompt: str) -> tuple[str, str]:
    """(requested, forbidden): the first two task words of a prompt."""
    found = [w for w in _words(prompt) if w in WORDS]
    if len(found) < 2:
        raise ValueError(f"not a task prompt: {prompt!r}")
    return found[0], found[1]


def rule_score(prompt: str, answer: str) -> float:
    """1.0 when the answer contains the requested word and not the forbidden one, else 0.0."""
    requested, forbidden = task_words(prompt)
    words = set(_words(answer))
    return float(requested in words and forbidden not in words)


def _helpful(rng: random.Random, w: str, v: str) -> str:
    others = [x for x in WORDS if x not in (w, v)]
    words = [rng.choice(others) for _ in range(ANSWER_WORDS)]
    words[rng.randrange(ANSWER_WORDS)] = w
    return " ".join(words)


def _wrong(rng: random.Random, w: str, v: str) -> str:
    others = [x for x in WORDS if x not in (w, v)]
    words = [rng.choice(others) for _ in range(ANSWER_WORDS)]
    if rng.random() < 0.5:
        words[rng.randrange(ANSWER_WORDS)] = v
    return " ".join(words)


def make_row(rng: random.Random) -> dict[str, str]:
    w, v = rng.sample(WORDS, 2)
    prompt = rng.choice(TEMPLATES).format(w=w, v=v)
    u = rng.random()
    response = _helpful(rng, w, v) if u < P_HELPFUL else LAZY if u < P_HELPFUL + P_LAZY else _wrong(rng, w, v)
    rejected = LAZY if rng.random() < P_REJECTED_LAZY else _wrong(rng, w, v)
    return {"prompt": prompt, "chosen": _helpful(rng, w, v), "rejected": rejected, "response": response}


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(count)]


def write_dataset(directory: str | Path, rows: int = 4000, eval_rows: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """Writes `train.jsonl` and `eval.jsonl` (disjoint random streams); returns their paths.

    Rewrites a file only when its content changes, so reruns leave it untouched."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, count, stream in zip(paths, (rows, eval_rows), (0, 1), strict=True):
        text = "".join(json.dumps(r) + "\n" for r in make_rows(count, seed * 2 + stream))
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.rlhf.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.eval_rows <= 0:
        print("error: --rows and --eval-rows must be positive", file=sys.stderr)
        return 2
    for path in write_dataset(args.out, args.rows, args.eval_rows, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
