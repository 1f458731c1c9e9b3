"""VisualChat data: JSONL conversations, DeepSpeed-VisualChat's template, label masking, concatenation
of samples into multi-image multi-round ones, blending datasets by ratio, and image loading.

**Conversations** are JSONL, one object per line::

    {"images": ["a.png", "b.png"],
     "turns": [{"question": "<image>\\n<image>\\nWhich image has more circles?", "answer": "first"},
               {"question": "How many red shapes does the second one have?", "answer": "2"}],
     "category": "pair_more_shape"}                      (optional; accuracy is reported per category)

Each `<image>` placeholder takes the next image of `images`, in order; the counts must match, and a
conversation holds at most `data.max_images` (<= 8) images. Relative image paths resolve against
the dataset's `image_root` (default: the JSONL file's directory). Answers may not contain `<image>`.

**Template** (DeepSpeed-VisualChat's `DST.py`; images numbered across the whole sample)::

    {system prompt}\\n\\n                              (first turn only, if data.system_prompt is set)
    ### Image 1:\\n<image>\\n### Image 2:\\n<image>\\n\\n    (one line pair per placeholder of the turn)
    ### Question:\\n{question without placeholders}\\n\\n### Answer:\\n{answer}<eos>

The `<image>` of the template is not text: it is `tokens_per_image` image slots (token type 2) that
the model fills with that image's projected tokens. Every text piece is tokenized on its own, so a
tokenizer without a dummy prefix (as trained here) gives the same ids in training and in chat.

**Labels**: only answer tokens and their closing EOS carry loss (`loss_mask` 1); the system prompt,
image headers, image slots, questions and padding carry none.

**Concatenation** (DeepSpeed's `random_grouping`): each epoch of a dataset shuffles its
conversations (seeded) and cuts them into consecutive groups of 1..`concat` conversations (sizes
drawn uniformly); each group becomes one multi-image, multi-round sample whose images are renumbered
1, 2, ... A group is closed early, before a conversation that would take it past `data.max_images`
images or `data.max_seq_len` tokens; that conversation starts the next group.

**Limits**: a conversation whose own turns exceed `data.max_seq_len` is truncated after its last
whole turn that fits (the images of dropped turns are dropped with them); one whose first turn alone
does not fit is an error naming its file and line. Rows hold `max_seq_len` input tokens.

**Blending**: the training stream interleaves datasets by `ratio` deterministically (Megatron's
blended-dataset rule: sample i comes from the dataset whose count lags its share the most), so after
any n samples dataset d has contributed within one sample of `n * ratio_d / sum(ratio)`.

**Images** are read with Pillow, converted to RGB, resized (bicubic) so the short side is
`vision.image_size`, centre-cropped to a square and normalised with `vision.image_mean/std`, as
CLIP's processor does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.data.jsonl import jsonl_lines
from jaxllm.data.tokenizer import TextTokenizer
from jaxllm.errors import UserError
from jaxllm.multimodal.config import MAX_IMAGES, VisionConfig
from jaxllm.multimodal.mmca import IMAGE, TEXT

IMAGE_PLACEHOLDER = "<image>"
Row = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Turn:
    question: str  # may hold <image> placeholders
    answer: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    images: tuple[Path, ...]
    turns: tuple[Turn, ...]
    source: str  # "file:line", for messages
    category: str = ""


# ---------------------------------------------------------------------------------------------------
# Reading


def parse_conversation(obj: object, source: str, root: Path, max_images: int = MAX_IMAGES) -> Conversation:
    """One JSONL record as a `Conversation`, checked (see the module docstring for the format)."""
    if not isinstance(obj, dict):
        raise UserError(f"{source}: expected a JSON object with 'images' and 'turns'")
    unknown = sorted(set(obj) - {"images", "turns", "category"})
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}'; a conversation has 'images', 'turns' and an optional "
                        "'category'")
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise UserError(f"{source}: 'images' must be a list of image file paths")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{source}: 'turns' must be a non-empty list of {{\"question\": ..., \"answer\": ...}}")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("question"), str) or \
                not isinstance(turn.get("answer"), str) or set(turn) - {"question", "answer"}:
            raise UserError(f"{source}: turn {i} must be {{\"question\": string, \"answer\": string}}")
        if IMAGE_PLACEHOLDER in turn["answer"]:
            raise UserError(f"{source}: turn {i}'s answer holds '{IMAGE_PLACEHOLDER}'; placeholders go in questions")
        parsed.append(Turn(turn["question"], turn["answer"]))
    placeholders = sum(t.question.count(IMAGE_PLACEHOLDER) for t in parsed)
    if placeholders != len(images):
        raise UserError(f"{source}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) in the questions but "
                        f"{len(images)} image(s); each image needs exactly one placeholder, in order")
    if len(images) > max_images:
        raise UserError(f"{source}: {len(images)} images; at most {max_images} per conversation (data.max_images, "
                        f"itself at most {MAX_IMAGES})")
    category = obj.get("category", "")
    if not isinstance(category, str):
        raise UserError(f"{source}: 'category' must be a string")
    paths = tuple(p if p.is_absolute() else root / p for p in map(Path, images))
    return Conversation(paths, tuple(parsed), source, category)


def read_conversations(path: str | Path, image_root: str | Path | None = None, max_images: int = MAX_IMAGES,
                       key: str = "data") -> list[Conversation]:
    """Every conversation of a JSONL file; blank lines are skipped, anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config key '{key}': conversation file '{path}' does not exist")
    root = Path(image_root) if image_root else path.parent
    out = [parse_conversation(obj, where, root, max_images) for where, obj in jsonl_lines(path)]
    if not out:
        raise UserError(f"config key '{key}': '{path}' holds no conversations")
    return out


# ---------------------------------------------------------------------------------------------------
# Images


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is pinned in constraints.txt
        raise UserError("reading images needs Pillow: pip install pillow") from None
    return Image


def load_image(path: str | Path, vision: VisionConfig, source: str = "") -> np.ndarray:
    """`[size, size, channels]` float32: RGB, short side resized (bicubic) to size, centre crop, normalised."""
    Image = _pil()
    where = f" (image of {source})" if source else ""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if vision.channels == 3 else "L")
            size = vision.image_size
            scale = size / min(img.size)
            w, h = max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))
            if (w, h) != img.size:
                img = img.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            pixels = np.asarray(img, np.float32) / 255.0
    except FileNotFoundError:
        raise UserError(f"image '{path}'{where} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"image '{path}'{where} cannot be read: {err}") from None
    pixels = pixels.reshape(vision.image_size, vision.image_size, vision.channels)
    return (pixels - np.asarray(vision.image_mean, np.float32)) / np.asarray(vision.image_std, np.float32)


def verify_images(conversations: Sequence[Conversation]) -> None:
    """Opens every image once (Pillow's `verify`), so an unreadable file fails before training starts."""
    Image = _pil()
    seen: set[Path] = set()
    for conv in conversations:
        for path in conv.images:
            if path in seen:
                continue
            seen.add(path)
            try:
                with Image.open(path) as img:
                    img.verify()
            except FileNotFoundError:
                raise UserError(f"{conv.source}: image '{path}' does not exist") from None
            except Exception as err:  # Pillow raises many types for corrupt files
                raise UserError(f"{conv.source}: image '{path}' cannot be read: {err}") from None


# ---------------------------------------------------------------------------------------------------
# Template and tokens


@dataclasses.dataclass(frozen=True)
class EncodedTurn:
    question: np.ndarray  # ids of "### Question:\n{q}\n\n### Answer:\n"
    answer: np.ndarray  # ids of the answer and EOS
    images: int  # placeholders of this turn


@dataclasses.dataclass(frozen=True)
class Sample:
    """One rendered sample: token ids (pad at image slots), token types and the answer (label) mask."""

    ids: np.ndarray
    types: np.ndarray
    answer: np.ndarray
    images: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.ids)


class Template:
    """DeepSpeed-VisualChat's template over a tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: TextTokenizer, tokens_per_image: int, system_prompt: str = ""):
        if tokenizer.eos_id < 0:
            raise UserError(f"tokenizer {tokenizer.path} has no EOS token; VisualChat ends every answer with EOS")
        self.tokenizer, self.tokens_per_image = tokenizer, tokens_per_image
        self.pad_id = max(tokenizer.pad_id, 0)
        self.eos_id = tokenizer.eos_id
        self.headers = [np.asarray(tokenizer.encode(f"### Image {k}:\n"), np.int32) for k in range(1, MAX_IMAGES + 1)]
        self.newline = np.asarray(tokenizer.encode("\n"), np.int32)
        self.system = np.asarray(tokenizer.encode(system_prompt + "\n\n") if system_prompt else [], np.int32)

    @staticmethod
    def question_text(question: str) -> str:
        return "### Question:\n" + question.replace(IMAGE_PLACEHOLDER, "").strip() + "\n\n### Answer:\n"

    @staticmethod
    def corpus(conversations: Sequence[Conversation], system_prompt: str = "") -> list[str]:
        """The texts a tokenizer for these conversations should be trained on."""
        texts = [f"### Image {k}:" for k in range(1, MAX_IMAGES + 1)] + ([system_prompt] if system_prompt else [])
        for conv in conversations:
            for turn in conv.turns:
                texts += [Template.question_text(turn.question), turn.answer]
        return texts

    def encode_turn(self, turn: Turn) -> EncodedTurn:
        encode = self.tokenizer.encode
        return EncodedTurn(np.asarray(encode(self.question_text(turn.question)), np.int32),
                           np.asarray(encode(turn.answer) + [self.eos_id], np.int32),
                           turn.question.count(IMAGE_PLACEHOLDER))

    def render(self, turns: Sequence[EncodedTurn], images: Sequence[Path] = (), *, last_answer: bool = True,
               system: bool = True) -> Sample:
        """The sample of these turns; with `last_answer=False` it ends at the last "### Answer:\\n" (a prompt)."""
        ids, types, answer = [], [], []

        def put(piece: np.ndarray, kind: int = TEXT, label: bool = False) -> None:
            ids.append(piece if kind == TEXT else np.full(len(piece), self.pad_id, np.int32))
            types.append(np.full(len(piece), kind, np.int32))
            answer.append(np.full(len(piece), label, bool))

        if system and len(self.system):
            put(self.system)
        slots = np.zeros(self.tokens_per_image, np.int32)
        k = 0
        for t, turn in enumerate(turns):
            for _ in range(turn.images):
                put(self.headers[k])
                put(slots, IMAGE)
                put(self.newline)
                k += 1
            if turn.images:
                put(self.newline)
            put(turn.question)
            if last_answer or t < len(turns) - 1:
                put(turn.answer, label=True)
        if len(images) != k:
            raise AssertionError(f"{len(images)} images for {k} placeholders")
        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        return Sample(cat(ids, np.int32), cat(types, np.int32), cat(answer, bool), tuple(images))

    def turn_length(self, turn: EncodedTurn, first_image: int) -> int:
        """Tokens `turn` adds to a sample whose images so far number `first_image`."""
        head = sum(len(self.headers[first_image + i]) + self.tokens_per_image + len(self.newline)
                   for i in range(turn.images))
        return head + (len(self.newline) if turn.images else 0) + len(turn.question) + len(turn.answer)


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    conversation: Conversation
    turns: tuple[EncodedTurn, ...]  # after truncation
    images: tuple[Path, ...]  # of the kept turns
    dropped_turns: int


def encode_conversations(conversations: Sequence[Conversation], template: Template, max_seq_len: int
                         ) -> list[EncodedConversation]:
    """Tokenizes every turn and applies the length rule (module docstring): whole trailing turns that do
    not fit in `max_seq_len` input tokens are dropped; a first turn that does not fit is an error."""
    out = []
    budget = max_seq_len + 1  # a row's inputs are the sample minus its last token
    for conv in conversations:
        turns = [template.encode_turn(t) for t in conv.turns]
        length, images, kept = len(template.system), 0, 0
        for turn in turns:
            extra = template.turn_length(turn, images)
            if length + extra > budget:
                break
            length, images, kept = length + extra, images + turn.images, kept + 1
        if kept == 0:
            need = len(template.system) + template.turn_length(turns[0], 0)
            raise UserError(f"{conv.source}: the first turn alone takes {need} tokens ({turns[0].images} image(s) of "
                            f"{template.tokens_per_image} tokens, plus text), more than data.max_seq_len="
                            f"{max_seq_len} allows; raise data.max_seq_len or shorten the turn")
        out.append(EncodedConversation(conv, tuple(turns[:kept]), conv.images[:images], len(turns) - kept))
    return out


def sample_length(template: Template, parts: Sequence[EncodedConversation]) -> tuple[int, int]:
    """(tokens, images) of these conversations concatenated into one sample."""
    length, images = len(template.system), 0
    for part in parts:
        for turn in part.turns:
            length += template.turn_length(turn, images)
            images += turn.images
    return length, images


def to_row(sample: Sample, pixels: Sequence[np.ndarray], seq_len: int, max_images: int,
           image_shape: tuple[int, int, int], pad_id: int) -> Row:
    """A training row: `seq_len` inputs, next-token targets, loss mask on answers, token types, images.

    Keys: `inputs`, `targets`, `token_types` (int32 `[seq_len]`), `positions` (0, 1, ...),
    `loss_mask` (f32: 1 where the target is an answer token), `images` (f32
    `[max_images, size, size, channels]`, unused slots zero) and `image_count`.
    """
    n = len(sample)
    if n - 1 > seq_len or len(pixels) > max_images:
        raise AssertionError(f"sample of {n} tokens / {len(pixels)} images exceeds the row")
    inputs = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, pad_id, np.int32)
    types = np.zeros(seq_len, np.int32)
    mask = np.zeros(seq_len, np.float32)
    inputs[:n - 1] = sample.ids[:-1]
    types[:n - 1] = sample.types[:-1]
    targets[:n - 1] = np.where(sample.types[1:] == TEXT, sample.ids[1:], pad_id)
    mask[:n - 1] = sample.answer[1:]
    images = np.zeros((max_images, *image_shape), np.float32)
    images[:len(pixels)] = np.asarray(pixels, np.float32).reshape(-1, *image_shape)
    return {"inputs": inputs, "targets": targets, "token_types": types, "positions": np.arange(seq_len, dtype=np.int32),
            "loss_mask": mask, "images": images, "image_count": np.int32(len(pixels))}


# ---------------------------------------------------------------------------------------------------
# Concatenation and blending


def group_conversations(parts: Sequence[EncodedConversation], concat: int, template: Template, max_seq_len: int,
                        max_images: int, seed: int) -> list[tuple[int, ...]]:
    """DeepSpeed's random grouping under jaxllm's limits: shuffled, cut into groups of 1..`concat`."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(parts))
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    target = int(rng.integers(1, concat + 1))
    for index in order:
        if current:
            length, images = sample_length(template, [parts[i] for i in [*current, index]])
            if len(current) >= target or length > max_seq_len + 1 or images > max_images:
                groups.append(tuple(current))
                current, target = [], int(rng.integers(1, concat + 1))
        current.append(int(index))
    if current:
        groups.append(tuple(current))
    return groups


def blend_schedule(ratios: Sequence[float], samples: int) -> np.ndarray:
    """`[samples]` dataset index of each blended sample: each step takes the dataset furthest below its share."""
    weights = np.asarray(ratios, np.float64)
    weights = weights / weights.sum()
    counts = np.zeros(len(weights), np.int64)
    out = np.empty(samples, np.int32)
    for i in range(samples):
        d = int(np.argmax(weights * (i + 1) - counts))
        out[i] = d
        counts[d] += 1
    return out


class VisualChatRows:
    """Random-access training rows (a Grain source): blend -> grouped sample -> template -> images -> row.

    Row `i` takes the `k`-th sample of dataset `d = blend[i]` (k = how many earlier rows took `d`),
    i.e. group `k mod len(groups[d])` of that dataset's concatenation groups. Everything is a
    deterministic function of the seed and `i`, so a resumed Grain iterator sees the same rows.
    """

    def __init__(self, datasets: Sequence[Sequence[EncodedConversation]], ratios: Sequence[float],
                 concats: Sequence[int], template: Template, vision: VisionConfig, seq_len: int, max_images: int,
                 seed: int, samples: int = 0):
        if not len(datasets) == len(ratios) == len(concats) or not datasets:
            raise ValueError("one ratio and one concat count per dataset")
        self.datasets, self.template, self.vision = list(datasets), template, vision
        self.seq_len, self.max_images = seq_len, max_images
        self.groups = [group_conversations(ds, c, template, seq_len, max_images, seed + 7919 * i)
                       for i, (ds, c) in enumerate(zip(datasets, concats, strict=True))]
        total = samples or sum(len(g) for g in self.groups)
        self.blend = blend_schedule(ratios, total)
        self.rank = np.zeros(total, np.int64)  # k: rows of the same dataset before this one
        for d in range(len(datasets)):
            where = np.nonzero(self.blend == d)[0]
            self.rank[where] = np.arange(len(where))

    def __len__(self) -> int:
        return len(self.blend)

    def parts(self, index: int) -> list[EncodedConversation]:
        d = int(self.blend[index])
        group = self.groups[d][int(self.rank[index]) % len(self.groups[d])]
        return [self.datasets[d][i] for i in group]

    def sample(self, index: int) -> Sample:
        parts = self.parts(index)
        return self.template.render([t for p in parts for t in p.turns], [path for p in parts for path in p.images])

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        sample = self.sample(index)
        pixels = [load_image(path, self.vision, p.conversation.source) for p in self.parts(index) for path in p.images]
        return to_row(sample, pixels, self.seq_len, self.max_images, image_shape(self.vision), self.template.pad_id)


def image_shape(vision: VisionConfig) -> tuple[int, int, int]:
    return (vision.image_size, vision.image_size, vision.channels)


class HeldOutRows:
    """Held-out conversations one per row (no concatenation), for the evaluation loss."""

    def __init__(self, parts: Sequence[EncodedConversation], template: Template, vision: VisionConfig, seq_len: int,
                 max_images: int):
        self.parts, self.template, self.vision = list(parts), template, vision
        self.seq_len, self.max_images = seq_len, max_images

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index: int) -> Row:
        part = self.parts[index]
        sample = self.template.render(part.turns, part.images)
        pixels = [load_image(p, self.vision, part.conversation.source) for p in part.images]
        return to_row(sample, pixels, self.seq_len, self.max_images, image_shape(self.vision), self.template.pad_id)


@dataclasses.dataclass(frozen=True)
class Question:
    """A held-out last question: the prompt up to its "### Answer:\\n", the reference answer and images."""

    sample: Sample
    answer: str
    category: str
    source: str


def last_questions(parts: Sequence[EncodedConversation], template: Template) -> list[Question]:
    """Every held-out conversation's last kept turn as a question for answer accuracy."""
    out = []
    for part in parts:
        conv = part.conversation
        prompt = template.render(part.turns, part.images, last_answer=False)
        out.append(Question(prompt, conv.turns[len(part.turns) - 1].answer, conv.category or "all", conv.source))
    return out
