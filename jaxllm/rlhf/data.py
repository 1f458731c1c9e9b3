"""RLHF data: JSONL preference rows, DeepSpeed-Chat's per-step split, and fixed-shape token rows.

A row is a JSON object with a `prompt` and, as each step needs, `chosen`, `rejected` and `response`
(step 1 trains on `response`, or on `chosen` when a row has none, as DeepSpeed-Chat does). Other keys
are ignored. The prompt and the answer are tokenized separately and concatenated, so a prompt's
tokens are the same in every pair and in step 3; the tokenizer's EOS ends every answer (DeepSpeed-Chat
appends `<|endoftext|>`).

`data_split` ("2,4,4") divides each dataset between the steps exactly as DeepSpeed-Chat's
`get_raw_dataset_split_index`: the weights are normalised, the boundaries are rounded cumulative
sums with the rounding error taken off the first share, and the rows are taken in the order of a
`numpy.random.RandomState(split_seed)` shuffle. The held-out file is split the same way.

Length limits: steps 1 and 2 right-pad `prompt + answer + EOS` to `max_seq_len` and cut longer
answers (DeepSpeed-Chat truncates too); a row whose prompt leaves no room for an answer token is
dropped. Step 3 left-pads prompts to `max_prompt_seq_len` and drops longer ones. Every cut and drop
is counted in a `DataReport`, which the commands print.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.data.jsonl import jsonl_lines
from jaxllm.data.tokenizer import TextTokenizer
from jaxllm.errors import UserError
from jaxllm.rlhf.config import parse_data_split

STAGE_INDEX = {"sft": 0, "reward": 1, "ppo": 2}
TEXT_KEYS = ("prompt", "chosen", "rejected", "response")


@dataclasses.dataclass(frozen=True)
class Record:
    """One JSONL row; `where` is `file:line` for error messages."""

    prompt: str
    chosen: str | None
    rejected: str | None
    response: str | None
    where: str


def read_records(paths: str | Sequence[str | Path], key: str = "data.path") -> list[Record]:
    """Reads JSONL rows from one or more files (a comma-separated string or a list).

    Every row needs a non-empty string `prompt`; `chosen`, `rejected` and `response` are optional here
    but must be strings when present. Blank lines are skipped. Errors name the file and line.
    """
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    if not paths:
        raise UserError(f"config key '{key}': no JSONL file given")
    records: list[Record] = []
    for path in map(Path, paths):
        for where, row in jsonl_rows(path, key):
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object with a 'prompt', got {type(row).__name__}")
            for name in TEXT_KEYS:
                if row.get(name) is not None and not isinstance(row[name], str):
                    raise UserError(f"{where}: '{name}' must be a string, got {type(row[name]).__name__}")
            if not row.get("prompt"):
                what = "is missing" if "prompt" not in row else "is empty"
                raise UserError(f"{where}: 'prompt' {what}; every row needs a non-empty prompt")
            records.append(Record(row["prompt"], row.get("chosen"), row.get("rejected"), row.get("response"), where))
    if not records:
        raise UserError(f"config key '{key}': {', '.join(map(str, paths))} holds no rows")
    return records


def jsonl_rows(path: Path, key: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed JSON) of each non-blank line of `path`, the config key `key` names.

    The file's existence is checked at the call, not at the first row, so that a missing file is the
    first error a command reports."""
    if not path.is_file():
        raise UserError(f"config key '{key}': file '{path}' does not exist")
    return jsonl_lines(path)


def split_indices(size: int, data_split: str, seed: int) -> list[np.ndarray]:
    """Row indices of each step's share, as DeepSpeed-Chat's `get_raw_dataset_split_index`.

    >>> [len(i) for i in split_indices(10, "2,4,4", 1234)]
    [2, 4, 4]
    """
    weights = parse_data_split(data_split)
    total = sum(weights)
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + int(round(weight / total * float(size))))
    diff = bounds[-1] - size
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    order = np.arange(size, dtype=np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64)
    np.random.RandomState(seed=seed).shuffle(order)
    return [order[bounds[i]:bounds[i + 1]] for i in range(len(weights))]


def stage_records(records: list[Record], data_split: str, seed: int, stage: str) -> list[Record]:
    """The rows of `records` that belong to `stage` ("sft", "reward" or "ppo")."""
    return [records[i] for i in split_indices(len(records), data_split, seed)[STAGE_INDEX[stage]]]


def answer_text(record: Record, stage: str) -> tuple[str, ...]:
    """The answers `stage` trains on, checked: non-empty strings, else an error naming the row."""
    if stage == "sft":
        names = ("response",) if record.response is not None else ("chosen",)
    elif stage == "reward":
        names = ("chosen", "rejected")
    else:
        return ()
    texts = []
    for name in names:
        text = getattr(record, name)
        if text is None:
            need = "a 'response' or a 'chosen' answer" if stage == "sft" else "'chosen' and 'rejected'"
            raise UserError(f"{record.where}: '{name}' is missing; step {stage} needs {need}")
        if not text.strip():
            raise UserError(f"{record.where}: '{name}' is empty; an answer needs at least one visible character")
        texts.append(text)
    return tuple(texts)


@dataclasses.dataclass
class DataReport:
    """What tokenization kept, cut and dropped, for one set of rows."""

    name: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    limit: str = ""

    def line(self) -> str:
        text = f"{self.name}: {self.kept} of {self.rows} rows kept"
        if self.truncated:
            text += f"; {self.truncated} answers cut to {self.limit}"
        if self.dropped:
            text += f"; {self.dropped} dropped: prompt longer than {self.limit}"
        return text


def special_ids(tokenizer: TextTokenizer) -> tuple[int, int]:
    """(eos, pad): the tokenizer's EOS ends answers; padding uses its PAD id, or EOS when it has none."""
    if tokenizer.eos_id < 0:
        raise UserError(f"tokenizer {tokenizer.path}: has no EOS token; RLHF answers end with EOS")
    return tokenizer.eos_id, tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id


def _encode(tokenizer: TextTokenizer, text: str, record: Record, name: str) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError(f"{record.where}: '{name}' encodes to no tokens")
    return ids


class SFTRows:
    """Step-1 rows in `jaxllm.step`'s batch format (`inputs`, `targets`, `segment_ids`, `positions`,
    `loss_mask`), `[width]` each, right-padded: `prompt + answer + EOS`, cut to `width` tokens.

    `loss_mask[t]` is 1 when `targets[t]` is an answer token (or EOS); with `loss_on_prompt` also when
    it is a prompt token (DeepSpeed-Chat's step 1 trains on every real token).
    """

    def __init__(self, rows: Sequence[tuple[list[int], int]], width: int, pad: int, loss_on_prompt: bool,
                 report: DataReport):
        """`rows`: (tokens, prompt length) with at most `width` tokens each."""
        self.report = report
        n = len(rows)
        self.inputs = np.full((n, width), pad, np.int32)
        self.targets = np.full((n, width), pad, np.int32)
        self.segment_ids = np.zeros((n, width), np.int32)
        self.positions = np.zeros((n, width), np.int32)
        self.loss_mask = np.zeros((n, width), np.float32)
        for i, (tokens, prompt_len) in enumerate(rows):
            length = len(tokens)
            self.inputs[i, :length] = tokens
            self.targets[i, :length - 1] = tokens[1:]
            self.segment_ids[i, :length] = 1
            self.positions[i, :length] = np.arange(length)
            first = 0 if loss_on_prompt else prompt_len - 1  # targets[t] is token t + 1
            self.loss_mask[i, first:length - 1] = 1.0

    @classmethod
    def from_records(cls, records: Sequence[Record], tokenizer: TextTokenizer, width: int,
                     loss_on_prompt: bool = False, name: str = "sft") -> SFTRows:
        eos, pad = special_ids(tokenizer)
        report = DataReport(name, rows=len(records), limit=f"data.max_seq_len={width} tokens")
        rows = []
        for record in records:
            (answer,) = answer_text(record, "sft")
            prompt = _encode(tokenizer, record.prompt, record, "prompt")
            tokens = prompt + _encode(tokenizer, answer, record, "response") + [eos]
            if len(prompt) >= width:
                report.dropped += 1
                continue
            if len(tokens) > width:
                report.truncated += 1
                tokens = tokens[:width]
            rows.append((tokens, len(prompt)))
        report.kept = len(rows)
        return cls(rows, width, pad, loss_on_prompt, report)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs[index], "targets": self.targets[index], "segment_ids": self.segment_ids[index],
                "positions": self.positions[index], "loss_mask": self.loss_mask[index]}


class PairRows:
    """Step-2 pairs: `chosen`, `rejected` (`[width]` right-padded token ids) and their lengths."""

    def __init__(self, records: Sequence[Record], tokenizer: TextTokenizer, width: int, name: str = "reward"):
        eos, pad = special_ids(tokenizer)
        self.report = DataReport(name, rows=len(records), limit=f"data.max_seq_len={width} tokens")
        pairs = []
        for record in records:
            chosen_text, rejected_text = answer_text(record, "reward")
            prompt = _encode(tokenizer, record.prompt, record, "prompt")
            if len(prompt) >= width:
                self.report.dropped += 1
                continue
            both = []
            for text, name_ in ((chosen_text, "chosen"), (rejected_text, "rejected")):
                tokens = prompt + _encode(tokenizer, text, record, name_) + [eos]
                if len(tokens) > width:
                    self.report.truncated += 1
                    tokens = tokens[:width]
                both.append(tokens)
            pairs.append(both)
        self.report.kept = len(pairs)
        n = len(pairs)
        self.chosen = np.full((n, width), pad, np.int32)
        self.rejected = np.full((n, width), pad, np.int32)
        self.chosen_length = np.zeros((n,), np.int32)
        self.rejected_length = np.zeros((n,), np.int32)
        for i, (chosen, rejected) in enumerate(pairs):
            self.chosen[i, :len(chosen)], self.chosen_length[i] = chosen, len(chosen)
            self.rejected[i, :len(rejected)], self.rejected_length[i] = rejected, len(rejected)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"chosen": self.chosen[index], "rejected": self.rejected[index],
                "chosen_length": self.chosen_length[index], "rejected_length": self.rejected_length[index]}


class PromptRows:
    """Step-3 prompts left-padded to `width`: `prompt` `[width]` and `prompt_length`.

    Prompts longer than `width` tokens are dropped and counted (DeepSpeed-Chat drops them too).
    """

    def __init__(self, records: Sequence[Record], tokenizer: TextTokenizer, width: int, name: str = "ppo"):
        _, pad = special_ids(tokenizer)
        self.report = DataReport(name, rows=len(records), limit=f"data.max_prompt_seq_len={width} tokens")
        prompts = []
        self.records = []
        for record in records:
            tokens = _encode(tokenizer, record.prompt, record, "prompt")
            if len(tokens) > width:
                self.report.dropped += 1
                continue
            prompts.append(tokens)
            self.records.append(record)
        self.report.kept = len(prompts)
        self.prompt = np.full((len(prompts), width), pad, np.int32)
        self.prompt_length = np.asarray([len(p) for p in prompts], np.int32)
        for i, tokens in enumerate(prompts):
            self.prompt[i, width - len(tokens):] = tokens

    def __len__(self) -> int:
        return len(self.prompt)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"prompt": self.prompt[index], "prompt_length": self.prompt_length[index]}


def read_text_rows(path: str | Path, tokenizer: TextTokenizer, width: int) -> SFTRows:
    """Language-model rows (PTX data) from a JSONL file of {"text": ...}: each text + EOS, cut to
    `width` tokens, with the loss on every token."""
    path = Path(path)
    lines = jsonl_rows(path, "ppo.unsupervised_data")
    eos, pad = special_ids(tokenizer)
    report = DataReport("ptx", limit=f"data.max_seq_len={width} tokens")
    rows = []
    for where, row in lines:
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: expected an object with a non-empty string 'text'")
        tokens = tokenizer.encode(text) + [eos]
        report.rows += 1
        if len(tokens) > width:
            report.truncated += 1
            tokens = tokens[:width]
        rows.append((tokens, 0))
    if not rows:
        raise UserError(f"config key 'ppo.unsupervised_data': '{path}' holds no rows")
    report.kept = len(rows)
    return SFTRows(rows, width, pad, True, report)


def tokenizer_corpus(records: Sequence[Record]) -> list[str]:
    """The texts a fresh tokenizer is trained on: every field of every row."""
    return [text for r in records for text in (r.prompt, r.chosen, r.rejected, r.response) if text]
