"""Configuration of the three RLHF steps: one YAML schema, strict keys, DeepSpeed-Chat's names and defaults.

Shared sections reuse `jaxllm.config` (`model`, `train`, `optimizer`, `checkpoint`, `mesh`,
`distributed`, `log`); `data`, `eval`, `sft`, `reward` and `ppo` are RLHF's own. Each command reads
the sections it needs: `sft` trains with `train.*`, `reward` likewise, and `ppo` counts `train.steps`
experience rounds and takes its batch sizes and learning rates from `ppo.*` (DeepSpeed-Chat's step-3
arguments). Unknown keys, wrong types and invalid values raise `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from jaxllm.config import (
    OptimizerConfig,
    RunConfig,
    build_config,
    read_values,
    require,
)
from jaxllm.errors import UserError

STAGES = ("sft", "reward", "ppo")


def parse_data_split(text: str) -> tuple[float, float, float]:
    """DeepSpeed-Chat's `--data_split` ("2,4,4"): each dataset's share for steps 1, 2 and 3."""
    try:
        parts = tuple(float(p) for p in str(text).split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise UserError(f"config key 'data.data_split': got {text!r}; expected three comma-separated "
                        "non-negative weights for steps 1, 2, 3 with a positive sum, e.g. '2,4,4'")
    return parts  # type: ignore[return-value]


@dataclasses.dataclass
class DataConfig:
    # synthetic: the rule-checkable preference task of jaxllm.rlhf.synthetic, written to WORKDIR/data/.
    # jsonl: rows {"prompt", "chosen", "rejected", "response"?} in `path` (comma-separated files).
    source: Literal["synthetic", "jsonl"] = "synthetic"
    path: str | None = None
    eval_path: str | None = None  # held-out rows (same keys); None: hold out eval_fraction of each share
    eval_fraction: float = 0.1
    data_split: str = "2,4,4"
    split_seed: int = 1234  # DeepSpeed-Chat's default --seed: the same split in all three steps
    # SentencePiece .model, tokenizer.json or a directory holding one; None: the init workdir's, else
    # (from scratch) a SentencePiece model of model.vocab_size trained on the data.
    tokenizer: str | None = None
    max_seq_len: int = 512  # steps 1-2: prompt + answer + EOS, right-padded; longer answers are cut
    max_prompt_seq_len: int = 256  # step 3: prompts left-padded to this; longer prompts are dropped
    synthetic_rows: int = 4000
    synthetic_eval_rows: int = 1000

    def validate(self) -> None:
        parse_data_split(self.data_split)
        if self.source == "jsonl":
            require(bool(self.path), "data.path", self.path, "one or more JSONL files when data.source=jsonl")
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a value in [0, 1)")
        for key in ("max_seq_len", "max_prompt_seq_len", "synthetic_rows", "synthetic_eval_rows"):
            require(getattr(self, key) > 0, f"data.{key}", getattr(self, key), "a positive integer")
        require(self.max_seq_len >= 2, "data.max_seq_len", self.max_seq_len, "at least 2 (a prompt and EOS)")


@dataclasses.dataclass
class EvalConfig:
    every: int = 0  # 0: evaluate at the end of the run only
    batches: int = 0  # 0: every held-out row

    def validate(self) -> None:
        require(self.every >= 0, "eval.every", self.every, "an integer >= 0")
        require(self.batches >= 0, "eval.batches", self.batches, "an integer >= 0 (0: all held-out rows)")


@dataclasses.dataclass
class SFTConfig:
    # A workdir of python -m jaxllm.train or of an earlier step whose decoder weights start training;
    # None: model.init_from (a Hugging Face directory) or a fresh model of the `model` section.
    init_workdir: str | None = None
    loss_on_prompt: bool = False  # True: DeepSpeed-Chat's step 1 (loss on prompt and answer)


@dataclasses.dataclass
class RewardConfig:
    init_workdir: str | None = None  # decoder weights to start from (an SFT or pre-training workdir)


@dataclasses.dataclass
class PPOConfig:
    actor_workdir: str | None = None  # step-1 workdir: actor and frozen reference
    critic_workdir: str | None = None  # step-2 workdir: critic and frozen reward model
    actor_learning_rate: float = 9.65e-6
    critic_learning_rate: float = 5e-6
    generation_batch_size: int = 8  # prompts per experience batch (global)
    train_batch_size: int = 8  # experience rows per PPO update (global)
    generation_batches: int = 1
    ppo_epochs: int = 1
    max_answer_seq_len: int = 256
    # DeepSpeed-Chat generates with the model's generation config, which is greedy for OPT and forced
    # greedy for Llama: temperature 0. Sampling (temperature > 0) explores more answers.
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    kl_ctl: float = 0.1
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    # PTX: "sft" (the step-1 share of the data as language-model rows) or a JSONL file of {"text": ...}.
    unsupervised_data: str | None = None
    unsup_coef: float = 27.8
    enable_ema: bool = False
    ema_beta: float = 0.992
    actor_lora_dim: int = 0  # 0: no LoRA
    critic_lora_dim: int = 0
    lora_module_name: str = "blocks"  # LoRA goes on the weight matrices whose path contains this
    lora_scaling: float = 1.0  # the update is lora_scaling / lora_dim * A @ B
    only_optimize_lora: bool = False
    actor_lora_learning_rate: float = 5e-4
    critic_lora_learning_rate: float = 5e-4

    def validate(self) -> None:
        for key in ("generation_batch_size", "train_batch_size", "generation_batches", "ppo_epochs",
                    "max_answer_seq_len"):
            require(getattr(self, key) > 0, f"ppo.{key}", getattr(self, key), "a positive integer")
        for key in ("actor_learning_rate", "critic_learning_rate", "actor_lora_learning_rate",
                    "critic_lora_learning_rate"):
            require(getattr(self, key) > 0, f"ppo.{key}", getattr(self, key), "a positive number")
        total = self.generation_batch_size * self.generation_batches
        require(total % self.train_batch_size == 0, "ppo.train_batch_size", self.train_batch_size,
                 f"a divisor of ppo.generation_batch_size x ppo.generation_batches = {total}")
        require(self.temperature >= 0, "ppo.temperature", self.temperature, "a number >= 0 (0 is greedy)")
        require(self.top_k >= 0, "ppo.top_k", self.top_k, "an integer >= 0")
        require(0.0 < self.top_p <= 1.0, "ppo.top_p", self.top_p, "a value in (0, 1]")
        for key in ("kl_ctl", "unsup_coef"):
            require(getattr(self, key) >= 0, f"ppo.{key}", getattr(self, key), "a number >= 0")
        for key in ("clip_reward_value", "cliprange", "cliprange_value"):
            require(getattr(self, key) > 0, f"ppo.{key}", getattr(self, key), "a positive number")
        require(0.0 <= self.gamma <= 1.0, "ppo.gamma", self.gamma, "a value in [0, 1]")
        require(0.0 <= self.lam <= 1.0, "ppo.lam", self.lam, "a value in [0, 1]")
        require(0.0 <= self.ema_beta < 1.0, "ppo.ema_beta", self.ema_beta, "a value in [0, 1)")
        for key in ("actor_lora_dim", "critic_lora_dim"):
            require(getattr(self, key) >= 0, f"ppo.{key}", getattr(self, key), "an integer >= 0 (0: no LoRA)")
        require(bool(self.lora_module_name), "ppo.lora_module_name", self.lora_module_name, "a non-empty string")
        require(self.lora_scaling > 0, "ppo.lora_scaling", self.lora_scaling, "a positive number")
        if self.only_optimize_lora:
            require(self.actor_lora_dim > 0 or self.critic_lora_dim > 0, "ppo.only_optimize_lora", True,
                     "false unless ppo.actor_lora_dim or ppo.critic_lora_dim is set")


def _optimizer_defaults() -> OptimizerConfig:
    return OptimizerConfig(weight_decay=0.0)  # DeepSpeed-Chat's SFT and PPO recipes use no weight decay


@dataclasses.dataclass
class RLHFConfig(RunConfig):
    """`python -m jaxllm.rlhf`'s config: the shared sections and the three steps' own."""

    optimizer: OptimizerConfig = dataclasses.field(default_factory=_optimizer_defaults)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)


def from_dict(values: dict[str, Any]) -> RLHFConfig:
    return build_config(RLHFConfig, values).validate()


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RLHFConfig:
    """Reads a YAML config (or the defaults), applies `key=value` overrides and validates the result."""
    return from_dict(read_values(path, overrides))
