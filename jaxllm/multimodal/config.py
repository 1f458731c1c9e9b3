"""Configuration of `python -m jaxllm.multimodal.train`: one YAML schema, strict keys, runnable defaults.

Shared sections reuse `jaxllm.config` (`model` is the language model: any jaxllm decoder family;
`train`, `optimizer`, `checkpoint`, `mesh`, `distributed`, `log`). `vision`, `multimodal`, `data`,
`synthetic` and `eval` are VisualChat's own. Unknown keys, wrong types and invalid values raise
`UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from jaxllm.config import (
    ModelConfig,
    RunConfig,
    build_config,
    read_values,
    require,
)

MAX_IMAGES = 8  # DeepSpeed-VisualChat's limit ("### Image 1:" .. "### Image 8:")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass
class VisionConfig:
    """A CLIP-style ViT: patch embedding, class token, learned positions, pre-norm blocks.

    With `init_from` (a Hugging Face CLIPVisionModel or CLIPModel directory), its config.json fixes
    the architecture and its safetensors the weights (`jaxllm.multimodal.vit.load_clip_vision`).
    """

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    d_ff: int = 256
    act: Literal["quick_gelu", "gelu", "gelu_tanh"] = "quick_gelu"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_from: str | None = None
    keep_class_token: bool = True  # image tokens = class token + patches (CLIP's last_hidden_state)
    image_mean: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = dataclasses.field(default_factory=lambda: list(CLIP_STD))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """Tokens each image contributes to the language model's sequence."""
        return self.grid**2 + int(self.keep_class_token)

    def validate(self) -> None:
        for key in ("image_size", "patch_size", "channels", "d_model", "layers", "heads", "d_ff"):
            require(getattr(self, key) > 0, f"vision.{key}", getattr(self, key), "a positive integer")
        require(self.image_size % self.patch_size == 0, "vision.image_size", self.image_size,
                 f"a multiple of vision.patch_size={self.patch_size}")
        require(self.d_model % self.heads == 0, "vision.d_model", self.d_model,
                 f"a multiple of vision.heads={self.heads}")
        for key in ("image_mean", "image_std"):
            require(len(getattr(self, key)) == self.channels, f"vision.{key}", getattr(self, key),
                     f"{self.channels} values (one per channel)")
        require(all(s > 0 for s in self.image_std), "vision.image_std", self.image_std, "positive values")


@dataclasses.dataclass
class MultimodalConfig:
    """How the parts are joined and which of them train (DeepSpeed trains projection + text embedding)."""

    attention: Literal["mmca", "causal"] = "mmca"  # causal: the decoder's own attention over all tokens
    train_projection: bool = True
    train_text_embed: bool = True  # the trainable copy of the decoder's input embedding
    train_vision: bool = False
    train_decoder: bool = False
    projection_eps: float = 1e-12  # LayerNorm after the linear projection, as DeepSpeed's "baseline"

    def trainable(self) -> tuple[str, ...]:
        """Top-level parameter groups that receive gradients."""
        flags = {"projection": self.train_projection, "text_embed": self.train_text_embed,
                 "vision": self.train_vision, "decoder": self.train_decoder}
        return tuple(name for name, on in flags.items() if on)

    def validate(self) -> None:
        require(bool(self.trainable()), "multimodal.train_projection", self.train_projection,
                 "at least one of multimodal.train_projection/train_text_embed/train_vision/train_decoder true")
        require(self.projection_eps > 0, "multimodal.projection_eps", self.projection_eps, "a positive number")


@dataclasses.dataclass
class DatasetConfig:
    """One JSONL file of conversations (format in `jaxllm.multimodal.data`)."""

    path: str = ""
    ratio: float = 1.0  # share of training samples drawn from this dataset (blending weight)
    concat: int = 1  # samples concatenated into one multi-image, multi-round sample: 1 .. concat
    image_root: str | None = None  # relative image paths resolve here (default: the JSONL's directory)


@dataclasses.dataclass
class DataConfig:
    # synthetic: the coloured-shapes visual QA task of jaxllm.multimodal.synthetic, written to
    # WORKDIR/data/ (its settings in the `synthetic` section). jsonl: the `datasets` named here.
    source: Literal["synthetic", "jsonl"] = "synthetic"
    datasets: dict[str, DatasetConfig] = dataclasses.field(default_factory=dict)
    eval_path: str | None = None  # held-out conversations (JSONL); synthetic: WORKDIR/data/eval.jsonl
    max_seq_len: int = 128  # tokens per row (text + image tokens); see data.py for the truncation rule
    max_images: int = MAX_IMAGES  # image slots per row (at most 8)
    system_prompt: str = ""  # text before the first turn of every sample; no loss on it
    # SentencePiece .model, tokenizer.json or a directory holding one; None: the workdir's, else a
    # SentencePiece model of model.vocab_size trained on the conversations.
    tokenizer: str | None = None
    samples_per_epoch: int = 0  # blended training samples per epoch; 0: the datasets' total size
    verify_images: bool = True  # open every image once at start-up (unreadable files fail early)

    def validate(self) -> None:
        if self.source == "jsonl":
            require(bool(self.datasets), "data.datasets", self.datasets,
                     "at least one dataset {name: {path: FILE}} when data.source=jsonl")
        for name, ds in self.datasets.items():
            require(bool(ds.path), f"data.datasets.{name}.path", ds.path, "a JSONL file")
            require(ds.ratio > 0, f"data.datasets.{name}.ratio", ds.ratio, "a positive number")
            require(ds.concat >= 1, f"data.datasets.{name}.concat", ds.concat, "a positive integer")
        require(self.max_seq_len >= 2, "data.max_seq_len", self.max_seq_len, "an integer >= 2")
        require(1 <= self.max_images <= MAX_IMAGES, "data.max_images", self.max_images,
                 f"an integer in [1, {MAX_IMAGES}]")
        require(self.samples_per_epoch >= 0, "data.samples_per_epoch", self.samples_per_epoch, "an integer >= 0")


@dataclasses.dataclass
class SyntheticConfig:
    """The synthetic visual QA task (`jaxllm.multimodal.synthetic`) used when data.source=synthetic."""

    single_rows: int = 2000  # one image, one question (counting)
    pair_rows: int = 2000  # two images, one question (which image has more ...)
    eval_rows: int = 200  # held-out rows of each kind
    single_concat: int = 2  # single-image samples concatenate into multi-image, multi-round ones
    max_shapes: int = 4
    # What questions count, drawn uniformly from this list: "any" ("How many shapes are there?"),
    # "colour" ("How many red shapes ...?"), "shape" ("How many circles ...?").
    attributes: list[str] = dataclasses.field(default_factory=lambda: ["colour", "shape"])
    grid: int = 4  # the board is grid x grid cells; each image is vision.image_size pixels square

    def validate(self) -> None:
        for key in ("single_rows", "pair_rows", "eval_rows", "single_concat", "max_shapes", "grid"):
            require(getattr(self, key) > 0, f"synthetic.{key}", getattr(self, key), "a positive integer")
        require(bool(self.attributes) and set(self.attributes) <= {"any", "colour", "shape"}, "synthetic.attributes",
                 self.attributes, "a non-empty list of 'any', 'colour' and 'shape'")


@dataclasses.dataclass
class EvalConfig:
    every: int = 0  # 0: evaluate at the end of the run only
    batches: int = 0  # 0: every held-out row
    accuracy: bool = True  # greedy answers to the held-out last questions, exact match, at the end
    max_new_tokens: int = 8

    def validate(self) -> None:
        require(self.every >= 0, "eval.every", self.every, "an integer >= 0")
        require(self.batches >= 0, "eval.batches", self.batches, "an integer >= 0 (0: all held-out rows)")
        require(self.max_new_tokens > 0, "eval.max_new_tokens", self.max_new_tokens, "a positive integer")


def _model_defaults() -> ModelConfig:
    return ModelConfig(layers=2, d_model=64, heads=4, vocab_size=512, max_len=128)


@dataclasses.dataclass
class VisualChatConfig(RunConfig):
    """`python -m jaxllm.multimodal.train`'s config: the shared sections and VisualChat's own."""

    model: ModelConfig = dataclasses.field(default_factory=_model_defaults)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    multimodal: MultimodalConfig = dataclasses.field(default_factory=MultimodalConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> VisualChatConfig:
        super().validate()
        require(self.data.max_seq_len <= self.model.max_len, "data.max_seq_len", self.data.max_seq_len,
                 f"at most model.max_len={self.model.max_len}")
        require(self.data.max_seq_len > self.vision.tokens, "data.max_seq_len", self.data.max_seq_len,
                 f"more than the {self.vision.tokens} tokens of one image")
        if self.data.source == "synthetic":
            require(self.vision.image_size % self.synthetic.grid == 0, "synthetic.grid", self.synthetic.grid,
                     f"a divisor of vision.image_size={self.vision.image_size}")
            require(self.synthetic.max_shapes <= self.synthetic.grid**2, "synthetic.max_shapes",
                     self.synthetic.max_shapes, f"at most synthetic.grid^2={self.synthetic.grid**2}")
        require(self.mesh.sequence in (1, -1), "mesh.sequence", self.mesh.sequence,
                 "1 (VisualChat rows are not split over a sequence axis)")
        return self


def from_dict(values: dict[str, Any]) -> VisualChatConfig:
    base = dataclasses.asdict(VisualChatConfig())["model"]  # the section's own defaults, not ModelConfig's
    values = dict(values)
    if isinstance(values.get("model") or {}, dict):
        values["model"] = {**base, **(values.get("model") or {})}
    return build_config(VisualChatConfig, values).validate()


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> VisualChatConfig:
    """Reads a YAML config (or the defaults), applies `key=value` overrides and validates the result."""
    return from_dict(read_values(path, overrides))
