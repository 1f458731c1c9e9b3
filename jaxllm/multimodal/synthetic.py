"""A synthetic visual question-answering task that can only be solved by looking at the images.

Each image is a `grid x grid` board of cells, some holding a coloured shape (square, circle or
triangle; red, green or blue, with a little colour noise). Questions count shapes of some kind
(`SyntheticConfig.attributes`): any shape ("How many shapes are there?"), a colour ("... red
shapes ...") or a shape ("... circles ..."):

- `single_count/<kind>` (one image): "How many red shapes are there?" -> a digit.
- `pair_more/<kind>` (two images): "Which image has more circles?" -> "first" or "second" (pairs with
  equal counts are redrawn, so chance is 50%). Getting these right needs the images in the order of
  their placeholders.

Questions about any shape are the easy ones: a model trained from scratch learns them first, and
they teach it to look at the images, which the colour and shape questions (a question-dependent
count, harder for a tiny model) then build on.

`write_dataset` writes PNG files and JSONL conversations (`jaxllm.multimodal.data` format):
`train_single.jsonl`, `train_pair.jsonl` and `eval.jsonl` (both kinds, held out, with a `category`).
`text_baseline` is the best answer a model can give without the images: the most frequent training
answer of each question text.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.data.jsonl import write_atomic
from jaxllm.multimodal.config import SyntheticConfig

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
MANIFEST = "manifest.json"


def draw_scene(rng: np.random.Generator, size: int, grid: int, max_shapes: int) -> tuple[np.ndarray, list]:
    """An RGB uint8 `[size, size, 3]` image and its shapes `[(cell, shape, colour), ...]`."""
    cell = size // grid
    image = np.full((size, size, 3), 245, np.uint8)
    count = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(grid * grid, size=count, replace=False)
    yy, xx = np.mgrid[0:cell, 0:cell] + 0.5
    centre, radius = cell / 2, cell / 2 - 0.75
    masks = {
        "square": (np.abs(yy - centre) <= radius - 0.5) & (np.abs(xx - centre) <= radius - 0.5),
        "circle": (yy - centre) ** 2 + (xx - centre) ** 2 <= radius**2,
        # apex at the top, base at the bottom: |x - c| grows linearly with y
        "triangle": (yy >= centre - radius) & (yy <= centre + radius) &
                    (np.abs(xx - centre) <= (yy - (centre - radius)) / 2 + 0.25),
    }
    shapes = []
    for c in cells:
        shape, colour = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(3)]
        rgb = np.clip(np.asarray(COLOURS[colour]) + rng.integers(-25, 26, 3), 0, 255).astype(np.uint8)
        r, k = divmod(int(c), grid)
        patch = image[r * cell:(r + 1) * cell, k * cell:(k + 1) * cell]
        patch[masks[shape]] = rgb
        shapes.append((int(c), shape, colour))
    return image, shapes


def _count(shapes: list, attribute: str) -> int:
    return sum(1 for _, shape, colour in shapes if attribute in (shape, colour, "any"))


def _attribute_question(rng: np.random.Generator, attributes: Sequence[str]) -> tuple[str, str, str]:
    """(kind, attribute, phrase): any shape ("shapes"), a colour ("red shapes") or a shape ("circles")."""
    kind = attributes[rng.integers(len(attributes))]
    if kind == "any":
        return kind, "any", "shapes"
    if kind == "colour":
        colour = list(COLOURS)[rng.integers(3)]
        return kind, colour, f"{colour} shapes"
    shape = SHAPES[rng.integers(3)]
    return kind, shape, f"{shape}s"


def _save(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def single_sample(rng: np.random.Generator, directory: Path, name: str, size: int, grid: int,
                  max_shapes: int, attributes: Sequence[str] = ("colour", "shape")) -> dict:
    image, shapes = draw_scene(rng, size, grid, max_shapes)
    _save(image, directory / "images" / f"{name}.png")
    kind, attribute, phrase = _attribute_question(rng, attributes)
    return {"images": [f"images/{name}.png"], "category": f"single_count/{kind}",
            "turns": [{"question": f"<image>\nHow many {phrase} are there?", "answer": str(_count(shapes, attribute))}]}


def pair_sample(rng: np.random.Generator, directory: Path, name: str, size: int, grid: int, max_shapes: int,
                attributes: Sequence[str] = ("colour", "shape")) -> dict:
    kind, attribute, phrase = _attribute_question(rng, attributes)
    while True:
        (a, sa), (b, sb) = (draw_scene(rng, size, grid, max_shapes) for _ in range(2))
        ca, cb = _count(sa, attribute), _count(sb, attribute)
        if ca != cb:
            break
    _save(a, directory / "images" / f"{name}_a.png")
    _save(b, directory / "images" / f"{name}_b.png")
    return {"images": [f"images/{name}_a.png", f"images/{name}_b.png"], "category": f"pair_more/{kind}",
            "turns": [{"question": f"<image>\n<image>\nWhich image has more {phrase}?",
                       "answer": "first" if ca > cb else "second"}]}


def write_dataset(directory: str | Path, cfg: SyntheticConfig, image_size: int, seed: int) -> dict[str, Path]:
    """Writes (or reuses, when its manifest matches) the dataset; returns the paths of its three files."""
    directory, grid = Path(directory), cfg.grid
    files = {name: directory / f"{name}.jsonl" for name in ("train_single", "train_pair", "eval")}
    manifest = {"single_rows": cfg.single_rows, "pair_rows": cfg.pair_rows, "eval_rows": cfg.eval_rows,
                "max_shapes": cfg.max_shapes, "attributes": list(cfg.attributes), "image_size": image_size,
                "grid": grid, "seed": seed, "version": 2}
    marker = directory / MANIFEST
    if marker.is_file() and all(f.is_file() for f in files.values()):
        try:
            if json.loads(marker.read_text()) == manifest:
                return files
        except json.JSONDecodeError:
            pass
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2023])
    args = (image_size, grid, cfg.max_shapes, tuple(cfg.attributes))
    rows = {
        "train_single": [single_sample(rng, directory, f"s{i}", *args) for i in range(cfg.single_rows)],
        "train_pair": [pair_sample(rng, directory, f"p{i}", *args) for i in range(cfg.pair_rows)],
        "eval": [single_sample(rng, directory, f"es{i}", *args) for i in range(cfg.eval_rows)]
        + [pair_sample(rng, directory, f"ep{i}", *args) for i in range(cfg.eval_rows)],
    }
    for name, records in rows.items():
        write_atomic(files[name], (json.dumps(r) + "\n" for r in records))
    marker.write_text(json.dumps(manifest))
    return files


def text_baseline_hits(train: Sequence, held_out: Sequence) -> dict[str, list[bool]]:
    """Per category, whether the best text-only answer to each held-out last question is right: the
    most frequent training answer of the same question text (the overall most frequent answer for
    unseen questions). `train` and `held_out` are `jaxllm.multimodal.data.Conversation`s."""
    by_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for conv in train:
        for turn in conv.turns:
            by_question[turn.question][turn.answer] += 1
            overall[turn.answer] += 1
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    for conv in held_out:
        turn = conv.turns[-1]
        votes = by_question.get(turn.question) or overall
        hits[conv.category or "all"].append(votes.most_common(1)[0][0] == turn.answer)
    return dict(sorted(hits.items()))


def text_baseline(train: Sequence, held_out: Sequence) -> dict[str, float]:
    """Held-out accuracy per category of the best text-only answers (`text_baseline_hits`)."""
    return {category: float(np.mean(h)) for category, h in text_baseline_hits(train, held_out).items()}
