"""Typed run configuration: YAML files, `section.key=value` overrides, strict validation.

Every section is a small dataclass with defaults that run. Unknown keys, wrong types and invalid
values raise `UserError` with one line naming the key, what was given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxllm.errors import UserError

Family = Literal["gpt2", "llama", "bloom"]
Dtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots"]
Activation = Literal["gelu_tanh", "gelu"]


@dataclasses.dataclass
class ModelConfig:
    family: Family = "gpt2"
    layers: int = 2
    d_model: int = 64
    heads: int = 4
    kv_heads: int | None = None  # None: as many as `heads` (no grouping)
    d_ff: int | None = None  # None: 4 * d_model (gpt2, bloom) or the SwiGLU size (llama)
    vocab_size: int = 1024
    max_len: int = 512
    compute_dtype: Dtype = "float32"
    remat: Remat = "none"
    # Causal attention in training and evaluation: the Pallas flash-attention kernel (no `[length, length]`
    # scores in memory) or the plain XLA reference; auto: the kernel when compiled for a GPU, XLA's for
    # a TPU (where the kernel's memory saving was mixed across the presets, docs/aot.md) and CPU.
    attention_implementation: Literal["auto", "xla", "pallas"] = "auto"
    # Run the blocks as one `jax.lax.scan` over their stacked weights: one block to compile instead of
    # `layers`. The training state keeps them stacked (checkpoints restore onto either layout; Hugging
    # Face files keep one entry per block).
    scan_layers: bool = False
    tie_embeddings: bool | None = None  # None: the family's choice (gpt2, bloom tie; llama does not)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # MLP of gpt2 and bloom: the tanh approximation of GELU (GPT-2's `gelu_new`, BLOOM's) or the exact
    # erf GELU (Hugging Face `activation_function: gelu`). llama's MLP is SwiGLU and takes neither.
    activation: Activation = "gelu_tanh"
    # A local Hugging Face directory (config.json + safetensors) whose weights start training; its
    # config.json fixes the architecture (see jaxllm/interop/hf.py `resolve_model_config`).
    init_from: str | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "llama":  # 2/3 of 4d, rounded up to a multiple of 64 as Llama does
            return 64 * -(-int(8 * self.d_model / 3) // 64)
        return 4 * self.d_model

    @property
    def tied(self) -> bool:
        return self.family != "llama" if self.tie_embeddings is None else self.tie_embeddings

    def validate(self) -> None:
        for key in ("layers", "d_model", "heads", "vocab_size", "max_len"):
            require(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "a positive integer")
        require(self.d_model % self.heads == 0, "model.d_model", self.d_model,
                 f"a multiple of model.heads={self.heads}")
        if self.kv_heads is not None:
            require(self.kv_heads > 0 and self.heads % self.kv_heads == 0, "model.kv_heads", self.kv_heads,
                     f"a positive divisor of model.heads={self.heads}")
        if self.family == "llama":
            require(self.head_dim % 2 == 0, "model.d_model", self.d_model,
                     "an even head size (d_model / heads) for rotary embeddings")
        if self.d_ff is not None:
            require(self.d_ff > 0, "model.d_ff", self.d_ff, "a positive integer or null")
        if self.family == "llama":
            require(self.activation == "gelu_tanh", "model.activation", self.activation,
                     "left unset for the llama family, whose MLP is SwiGLU")
        if self.init_from is not None:
            require(bool(self.init_from.strip()), "model.init_from", self.init_from,
                     "a Hugging Face checkpoint directory or null")
        for key in ("norm_eps", "rope_theta"):
            require(0 < getattr(self, key) < math.inf, f"model.{key}", getattr(self, key), "a positive finite number")
        require(0 <= self.init_std < math.inf, "model.init_std", self.init_std, "a finite number >= 0")


@dataclasses.dataclass
class DataConfig:
    source: Literal["synthetic", "text", "tokens"] = "synthetic"
    # text: corpus files (.jsonl with a "text" field, or .txt); empty means the offline stdlib corpus.
    # tokens: a directory written by `python -m jaxllm.data.prepare`.
    path: str | None = None
    seq_len: int = 128
    tokenizer: str | None = None  # text: a SentencePiece model; None trains one of model.vocab_size
    cache_dir: str | None = None  # text: where tokenized shards go; None means WORKDIR/data
    eval_fraction: float = 0.05
    synthetic_rows: int = 4096

    def validate(self) -> None:
        require(self.seq_len > 0, "data.seq_len", self.seq_len, "a positive integer")
        require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "a value in [0, 1)")
        require(self.synthetic_rows > 0, "data.synthetic_rows", self.synthetic_rows, "a positive integer")
        if self.source == "tokens":
            require(self.path is not None, "data.path", self.path, "a token-shard directory when data.source=tokens")


DEFAULT_COMPILE_CACHE = "~/.cache/jaxllm/xla"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, in sequences
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 10
    log_every: int = 10
    # XLA's persistent compilation cache: a second start skips compiling the step. null or "" turns it
    # off; left at this default, $JAX_COMPILATION_CACHE_DIR (when set) chooses the location instead.
    compile_cache: str | None = DEFAULT_COMPILE_CACHE
    # With a curriculum or random-LTD the batch shape changes a few times: compile every later shape's
    # program on a background thread while the earlier ones train, instead of stopping at each change.
    background_compile: bool = True
    # A run stops with an error (and saves no more checkpoints) once this many steps in a row had a
    # non-finite loss or gradient and were skipped: it has diverged. 0 never stops.
    max_skipped_steps: int = 10
    # Loss-spike guard (jaxllm.engine.loss_spike): skip a step whose loss is more than this many times
    # the running mean of the accepted steps' losses, as a non-finite step is skipped. 0 turns it off.
    loss_spike_factor: float = 0.0
    # The running mean covers about this many accepted steps, and the guard acts once that many have passed.
    loss_spike_window: int = 100

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        for key in ("warmup_steps", "max_skipped_steps"):
            require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "an integer >= 0")
        require(0 < self.lr < math.inf, "train.lr", self.lr, "a positive finite number")
        require(self.loss_spike_factor == 0 or 1 < self.loss_spike_factor < math.inf, "train.loss_spike_factor",
                self.loss_spike_factor, "0 (off) or a finite number > 1")
        require(self.loss_spike_window > 0, "train.loss_spike_window", self.loss_spike_window, "a positive integer")
        require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "a value in [0, 1]")
        require(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
                 f"a multiple of train.grad_accum={self.grad_accum}")


# DeepSpeed's parameters of its communication-efficient optimizers, with DeepSpeed's defaults, and the
# optimizers each one belongs to (runtime/fp16/onebit/{adam,zoadam,lamb}.py).
ONEBIT_DEFAULTS: dict[str, Any] = {
    "freeze_step": 100_000, "var_freeze_step": 100_000, "var_update_scaler": 16, "local_step_scaler": 32678,
    "local_step_clipper": 16, "max_coeff": 10.0, "min_coeff": 0.01, "coeff_beta": 0.9, "factor_max": 4.0,
    "factor_min": 0.5, "factor_threshold": 0.1,
}
ONEBIT_PARAMS: dict[str, tuple[str, ...]] = {
    "adamw": (),
    "onebit_adam": ("freeze_step",),
    "zero_one_adam": ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper"),
    "onebit_lamb": ("freeze_step", "max_coeff", "min_coeff", "coeff_beta", "factor_max", "factor_min",
                    "factor_threshold"),
}


@dataclasses.dataclass
class OptimizerConfig:
    # adamw: Optax AdamW. onebit_adam | zero_one_adam | onebit_lamb: DeepSpeed's compressed-communication
    # optimizers (jaxllm.optim); they switch the run to the per-device train step of jaxllm.engine.onebit.
    name: Literal["adamw", "onebit_adam", "zero_one_adam", "onebit_lamb"] = "adamw"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it (1-bit optimizers: each device's gradient)
    # DeepSpeed-named parameters; null means DeepSpeed's default (ONEBIT_DEFAULTS). Each belongs to the
    # optimizers listed in ONEBIT_PARAMS; setting one for another optimizer is an error.
    freeze_step: int | None = None
    var_freeze_step: int | None = None
    var_update_scaler: int | None = None
    local_step_scaler: int | None = None
    local_step_clipper: int | None = None
    max_coeff: float | None = None
    min_coeff: float | None = None
    coeff_beta: float | None = None
    factor_max: float | None = None
    factor_min: float | None = None
    factor_threshold: float | None = None
    # onebit_adam and zero_one_adam: Adam's bias correction, 1 / (1 - b1^t) on m and 1 / (1 - b2^k) on v
    # (k: the variance's updates so far). Off by default, as in DeepSpeed; jaxllm's option.
    bias_correction: bool = False
    # onebit_adam, zero_one_adam, onebit_lamb: the dtype of their exact (uncompressed) gradient averages
    # (warm-up, 0/1 Adam's variance refreshes). bfloat16 halves those bytes, as DeepSpeed's fp16 engine
    # all-reduce does; float32 keeps them exact.
    exact_allreduce_dtype: Literal["float32", "bfloat16"] = "float32"

    def param(self, key: str) -> Any:
        """A DeepSpeed-named parameter's value: the configured one or DeepSpeed's default."""
        value = getattr(self, key)
        return ONEBIT_DEFAULTS[key] if value is None else value

    def validate(self) -> None:
        for key in ("b1", "b2"):
            require(0.0 <= getattr(self, key) < 1.0, f"optimizer.{key}", getattr(self, key), "a value in [0, 1)")
        require(0 < self.eps < math.inf, "optimizer.eps", self.eps, "a positive finite number")
        require(0 <= self.weight_decay < math.inf, "optimizer.weight_decay", self.weight_decay,
                "a finite number >= 0")
        require(0 <= self.grad_clip < math.inf, "optimizer.grad_clip", self.grad_clip,
                "a finite number >= 0 (0: no clipping)")
        allowed = ONEBIT_PARAMS[self.name]
        for key in ONEBIT_DEFAULTS:
            if getattr(self, key) is not None and key not in allowed:
                owners = [name for name, keys in ONEBIT_PARAMS.items() if key in keys]
                raise UserError(f"config key 'optimizer.{key}' applies to optimizer.name={' or '.join(owners)}, "
                                f"not {self.name!r}" + (f" (whose parameters are {', '.join(allowed)})" if allowed
                                                         else ""))
        if self.bias_correction:
            require(self.name in ("onebit_adam", "zero_one_adam"), "optimizer.bias_correction", True,
                     f"false unless optimizer.name is onebit_adam or zero_one_adam (it is {self.name!r}; adamw "
                     "always corrects, onebit_lamb never does)")
        if self.exact_allreduce_dtype != "float32":
            require(self.name != "adamw", "optimizer.exact_allreduce_dtype", self.exact_allreduce_dtype,
                     "float32 with optimizer.name=adamw (its gradient all-reduce is GSPMD's; the option is for "
                     "onebit_adam, zero_one_adam and onebit_lamb)")
        for key in ("freeze_step", "var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper"):
            require(self.param(key) > 0, f"optimizer.{key}", self.param(key), "a positive integer")
        for key in ("max_coeff", "min_coeff", "factor_max", "factor_min"):
            require(self.param(key) > 0, f"optimizer.{key}", self.param(key), "a positive number")
        for low, high in (("min_coeff", "max_coeff"), ("factor_min", "factor_max")):
            require(self.param(low) <= self.param(high), f"optimizer.{low}", self.param(low),
                     f"at most optimizer.{high}={self.param(high)}")
        for key in ("coeff_beta", "factor_threshold"):
            require(0.0 <= self.param(key) < 1.0, f"optimizer.{key}", self.param(key), "a value in [0, 1)")

    def warn_unreached_phases(self, steps: int) -> None:
        """Warns when the run ends before the optimizer's compressed phase (harmless, but pointless)."""
        if self.name in ("onebit_adam", "onebit_lamb") and self.param("freeze_step") >= steps:
            warnings.warn(
                f"optimizer.freeze_step={self.param('freeze_step')} is not below train.steps={steps}: every step "
                f"is a warm-up step with an exact {self.exact_allreduce_dtype} gradient average, nothing is compressed "
                f"({self.name} without compression); set optimizer.freeze_step below train.steps to compress",
                UserWarning, stacklevel=3)
        if self.name == "zero_one_adam" and self.param("var_freeze_step") + 1 >= steps:
            warnings.warn(
                f"optimizer.var_freeze_step={self.param('var_freeze_step')} is not below train.steps - 1 = "
                f"{steps - 1}: the run never freezes the variance, so it never takes local steps (every step "
                "communicates); set optimizer.var_freeze_step below train.steps - 1 for local steps",
                UserWarning, stacklevel=3)


@dataclasses.dataclass
class EvalConfig:
    every: int = 0  # 0 disables periodic evaluation
    batches: int = 2

    def validate(self) -> None:
        require(self.every >= 0, "eval.every", self.every, "an integer >= 0")
        require(self.batches > 0, "eval.batches", self.batches, "a positive integer")


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end of the run
    keep: int = 3
    async_save: bool = True
    # A SHA-256 manifest beside each finished checkpoint, checked on resume (bit rot, truncated files).
    # The lead process reads the whole checkpoint once per save: turn off for checkpoints of terabytes.
    checksums: bool = True

    def validate(self) -> None:
        require(self.every >= 0, "checkpoint.every", self.every, "an integer >= 0")
        require(self.keep > 0, "checkpoint.keep", self.keep, "a positive integer")


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: all devices left after the other axes
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 3  # what `fsdp` shards: 1 optimizer, 2 + gradients, 3 + parameters
    # Host offload (ZeRO-Offload): `optimizer` keeps the optimizer state in host memory (`pinned_host`)
    # and streams it through the update inside the one jitted step, a block at a time when the blocks are
    # stacked (`scan_layers`); `optimizer_and_params` keeps the f32 master parameters there too, the
    # devices holding a compute-dtype copy for the forward and backward passes. Checkpoints are the same
    # either way. Not for the 1-bit optimizers, whose state is laid out per device.
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    # Pipeline parallelism (`docs/pipeline.md`): the decoder's blocks split over this many devices.
    stage: int = 1
    # gpipe: each stage holds layers/stage consecutive blocks; circular: `pipeline_repeats` groups of
    # layers/(stage x repeats) blocks, and micro-batches go round the stages that many times. A layer
    # count these do not divide is padded with skipped blocks up to the next multiple.
    pipeline_schedule: Literal["gpipe", "circular"] = "gpipe"
    pipeline_repeats: int = 1  # layer groups per stage (circular only); the bubble shrinks by this factor
    # Micro-batches the rows of each loss call are cut into (after train.grad_accum's split); 0: 2 x stage.
    pipeline_microbatches: int = 0

    def validate(self) -> None:
        sizes = {k: getattr(self, k) for k in ("data", "fsdp", "tensor", "sequence")}
        for key, size in sizes.items():
            require(size == -1 or size > 0, f"mesh.{key}", size, "a positive integer or -1")
        require(sum(size == -1 for size in sizes.values()) <= 1, "mesh", sizes, "at most one axis set to -1")
        require(self.stage > 0, "mesh.stage", self.stage, "a positive integer")
        require(self.pipeline_repeats > 0, "mesh.pipeline_repeats", self.pipeline_repeats, "a positive integer")
        require(self.pipeline_schedule == "circular" or self.pipeline_repeats == 1, "mesh.pipeline_repeats",
                 self.pipeline_repeats, "1 unless mesh.pipeline_schedule is circular")
        require(self.pipeline_microbatches >= 0, "mesh.pipeline_microbatches", self.pipeline_microbatches,
                 "a non-negative integer (0: twice mesh.stage)")
        microbatches = self.microbatches()
        require(self.pipeline_schedule == "gpipe" or microbatches >= self.stage, "mesh.pipeline_microbatches",
                 microbatches, f"at least mesh.stage={self.stage} for the circular schedule")

    def microbatches(self) -> int:
        return self.pipeline_microbatches or 2 * self.stage

    def check_pipeline(self, layers: int) -> None:
        """Cross-section check of the pipeline: a real block on every stage."""
        if self.stage == 1:
            return
        # Layer groups that the layers do not fill evenly are padded with skipped blocks
        # (jaxllm.models.pipeline); a stage without a single real block would only idle.
        require(layers >= self.stage, "mesh.stage", self.stage, f"at most model.layers={layers}")


@dataclasses.dataclass
class DistributedConfig:
    # Empty coordinator and auto=false: one process. auto=true lets JAX discover the cluster (TPU pods, SLURM).
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False

    def validate(self) -> None:
        require(self.num_processes > 0, "distributed.num_processes", self.num_processes, "a positive integer")
        require(0 <= self.process_id < self.num_processes, "distributed.process_id", self.process_id,
                 f"an integer in [0, {self.num_processes})")


@dataclasses.dataclass
class LogConfig:
    progress_bar: bool = True
    tensorboard: bool = True


# Data efficiency (DeepSpeed's `data_efficiency` section; keys keep DeepSpeed's names).


@dataclasses.dataclass
class CurriculumScheduleConfig:
    """DeepSpeed's curriculum `schedule_config`; which keys are needed depends on `schedule_type`."""

    total_curriculum_step: int | None = None  # fixed_linear, fixed_root
    difficulty_step: int | None = None  # fixed_linear, fixed_root: difficulties are multiples of it
    root_degree: float | None = None  # fixed_root
    difficulty: list[int] | None = None  # fixed_discrete: n + 1 difficulties
    max_step: list[int] | None = None  # fixed_discrete: the last step of each of the first n
    function: str | None = None  # custom: "package.module:function", step -> difficulty


@dataclasses.dataclass
class CurriculumMetricConfig:
    """One entry of `curriculum.curriculum_metrics` (DeepSpeed's per-metric keys)."""

    min_difficulty: int | None = None
    max_difficulty: int | None = None
    schedule_type: Literal["fixed_linear", "fixed_root", "fixed_discrete", "custom"] = "fixed_linear"
    schedule_config: CurriculumScheduleConfig = dataclasses.field(default_factory=CurriculumScheduleConfig)
    difficulty_type: Literal["value", "percentile"] = "value"
    clustering_type: Literal["schedule_based", "single_cluster"] = "schedule_based"
    # The metric's directory written by `python -m jaxllm.data.analyze` (or a file inside it).
    index_to_sample_path: str | None = None
    index_to_metric_path: str | None = None  # accepted for DeepSpeed configs; the directory holds both


@dataclasses.dataclass
class CurriculumConfig:
    """Curriculum learning (`jaxllm.data.curriculum`): seqlen_truncate / seqlen_reshape act on batches,
    other metrics draw batches from difficulty clusters of an analyzer index."""

    enabled: bool = False
    seed: int | None = None  # DeepSpeed's data_efficiency.seed for the sampler; None: the run's seed
    curriculum_metrics: dict[str, CurriculumMetricConfig] = dataclasses.field(default_factory=dict)
    # Train on the baseline's token budget (train.steps x batch x seq_len tokens): shorter curriculum
    # rows mean more steps, and the learning rate decays by consumed tokens.
    token_budget: bool = False
    data_cluster_path: str | None = None  # accepted for DeepSpeed configs; clusters are rebuilt in memory

    def schedule(self, name: str) -> dict[str, Any]:
        """Metric `name` as the plain DeepSpeed dict `jaxllm.data.curriculum.schedule_value` reads."""
        metric = self.curriculum_metrics[name]
        sched = {k: v for k, v in dataclasses.asdict(metric.schedule_config).items() if v is not None}
        if metric.schedule_type == "custom" and isinstance(sched.get("function"), str):
            sched["function"] = _import_function(sched["function"], f"curriculum.curriculum_metrics.{name}"
                                                 ".schedule_config.function")
        return {**dataclasses.asdict(metric), "schedule_config": sched}

    def validate(self) -> None:
        if not self.enabled:
            return
        from jaxllm.data.curriculum import SEQLEN_METRICS, check_schedule

        require(bool(self.curriculum_metrics), "curriculum.curriculum_metrics", self.curriculum_metrics,
                 "at least one metric when curriculum.enabled")
        seqlen = [m for m in self.curriculum_metrics if m in SEQLEN_METRICS]
        require(len(seqlen) <= 1, "curriculum.curriculum_metrics", list(self.curriculum_metrics),
                 "at most one of seqlen_truncate, seqlen_reshape")
        for name, metric in self.curriculum_metrics.items():
            where = f"curriculum.curriculum_metrics.{name}"
            for key in ("min_difficulty", "max_difficulty"):
                if metric.schedule_type != "custom":
                    require(getattr(metric, key) is not None, f"{where}.{key}", None, "an integer")
            if name in SEQLEN_METRICS:
                require(metric.clustering_type == "single_cluster", f"{where}.clustering_type",
                         metric.clustering_type, "'single_cluster' for a sequence-length metric")
            elif metric.clustering_type == "schedule_based":
                require(metric.index_to_sample_path is not None, f"{where}.index_to_sample_path", None,
                         "the metric's index directory from python -m jaxllm.data.analyze")
            if metric.schedule_type == "custom":
                require(":" in (metric.schedule_config.function or ""), f"{where}.schedule_config.function",
                         metric.schedule_config.function, "'package.module:function' for schedule_type custom")
                continue
            check_schedule(self.schedule(name), where)


@dataclasses.dataclass
class LTDScheduleStepsConfig:
    require_steps: int | None = None  # steps to grow from min_value to max_value
    seq_per_step: int | None = None  # kept lengths are multiples of it


@dataclasses.dataclass
class LTDScheduleConfig:
    """DeepSpeed's `random_ltd_schedule`: the kept length grows linearly with the (0-based) step."""

    min_value: int | None = None
    max_value: int | None = None
    schedule_type: Literal["fixed_linear"] = "fixed_linear"
    schedule_config: LTDScheduleStepsConfig = dataclasses.field(default_factory=LTDScheduleStepsConfig)


@dataclasses.dataclass
class LayerTokenLRConfig:
    """LayerToken learning rate: decay by consumed layer-tokens; the run stops at the baseline's budget."""

    enabled: bool = False
    decay: Literal["cosine", "linear"] = "cosine"


@dataclasses.dataclass
class RandomLTDConfig:
    """random-LTD (`jaxllm.ltd`): the listed layers run on a random, sorted subset of each row's tokens."""

    enabled: bool = False
    total_layer_num: int | None = None  # optional check: must equal model.layers
    random_ltd_layer_num: int | None = None  # optional check: must equal the number of layer ids
    random_ltd_layer_id: list[int] | None = None  # None: every layer but the first and the last
    random_ltd_schedule: LTDScheduleConfig = dataclasses.field(default_factory=LTDScheduleConfig)
    layer_token_lr_schedule: LayerTokenLRConfig = dataclasses.field(default_factory=LayerTokenLRConfig)
    attention_implementation: Literal["auto", "xla", "pallas"] = "auto"  # auto: Pallas kernel on GPU/TPU

    def schedule(self) -> dict[str, Any]:
        """The schedule as the plain DeepSpeed dict `jaxllm.ltd.kept_length` reads."""
        return dataclasses.asdict(self.random_ltd_schedule)

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        from jaxllm.ltd import check_layers, default_layers

        ids = default_layers(num_layers) if self.random_ltd_layer_id is None else self.random_ltd_layer_id
        return check_layers(ids, num_layers)

    def check(self, num_layers: int, seq_len: int) -> None:
        if not self.enabled:
            return
        from jaxllm.ltd import check_ltd_schedule

        if self.total_layer_num is not None:
            require(self.total_layer_num == num_layers, "random_ltd.total_layer_num", self.total_layer_num,
                     f"model.layers={num_layers}")
        ids = self.layer_ids(num_layers)
        if self.random_ltd_layer_num is not None:
            require(self.random_ltd_layer_num == len(ids), "random_ltd.random_ltd_layer_num",
                     self.random_ltd_layer_num, f"the number of layer ids ({len(ids)})")
        check_ltd_schedule(self.schedule(), seq_len)


# Compression (`jaxllm.compression`, `python -m jaxllm.compress`); see docs/compression.md.


@dataclasses.dataclass
class CompressionRuleConfig:
    """One rule of `compression.rules`: settings for modules whose path or Hugging Face name matches a regex.

    Later rules override the weight settings (when they set weight_bits) and the activation settings
    (when they set act_bits) of earlier ones (`jaxllm.compression.rules`).
    """

    modules: list[str] = dataclasses.field(default_factory=list)  # regexes, e.g. ["attn\\.w[qkvo]", "mlp.c_fc"]
    weight_bits: int | None = None  # 1 binary, 2 ternary, 3-8 symmetric/asymmetric; null: weights untouched
    weight_groups: int = 1  # DeepSpeed's quantize_groups (embeddings: one group per row)
    weight_symmetric: bool = True
    act_bits: int | None = None  # input activations of the matched matmuls; null: untouched
    act_symmetric: bool = True
    act_range: Literal["dynamic", "static"] = "dynamic"  # token-wise ranges, or one calibrated EMA range


@dataclasses.dataclass
class LayerReductionConfig:
    enabled: bool = False
    teacher_layer: list[int] | None = None  # student layer i starts as teacher layer teacher_layer[i]


@dataclasses.dataclass
class LKDConfig:
    """ZeroQuant's layer-by-layer distillation (`python -m jaxllm.compress lkd`)."""

    steps: int = 100  # AdamW steps per block
    lr: float = 1e-4
    weight_decay: float = 0.0
    batches: int = 8  # batches (of train.batch_size rows) whose teacher hidden states the steps cycle through


@dataclasses.dataclass
class KDConfig:
    """Weights of XTC's distillation loss terms (`python -m jaxllm.compress xtc`)."""

    logits: float = 1.0
    attention: float = 1.0
    hidden: float = 1.0
    lm: float = 0.0  # cross-entropy on the data's labels (not in DeepSpeed's recipe)


@dataclasses.dataclass
class CompressionConfig:
    rules: dict[str, CompressionRuleConfig] = dataclasses.field(default_factory=dict)
    # A DeepSpeed JSON config whose `compression_training` section adds rules before `rules`.
    deepspeed_config: str | None = None
    layer_reduction: LayerReductionConfig = dataclasses.field(default_factory=LayerReductionConfig)
    calibration_batches: int = 4  # batches that set static activation ranges
    implementation: Literal["auto", "xla", "pallas"] = "auto"  # quantized matmul; auto: Pallas on GPU/TPU
    lkd: LKDConfig = dataclasses.field(default_factory=LKDConfig)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)

    def validate(self) -> None:
        for name, rule in self.rules.items():
            key = f"compression.rules.{name}"
            require(bool(rule.modules), f"{key}.modules", rule.modules, "a non-empty list of module regexes")
            for field in ("weight_bits", "act_bits"):
                bits = getattr(rule, field)
                require(bits is None or 1 <= bits <= 8, f"{key}.{field}", bits, "an integer from 1 to 8 or null")
            require(rule.weight_groups > 0, f"{key}.weight_groups", rule.weight_groups, "a positive integer")
        if self.deepspeed_config is not None:
            require(Path(self.deepspeed_config).is_file(), "compression.deepspeed_config", self.deepspeed_config,
                     "an existing DeepSpeed JSON file")
        require(self.calibration_batches > 0, "compression.calibration_batches", self.calibration_batches,
                 "a positive integer")
        for key in ("steps", "batches"):
            require(getattr(self.lkd, key) > 0, f"compression.lkd.{key}", getattr(self.lkd, key), "a positive integer")
        require(self.lkd.lr > 0, "compression.lkd.lr", self.lkd.lr, "a positive number")
        for key in ("logits", "attention", "hidden", "lm"):
            require(getattr(self.kd, key) >= 0, f"compression.kd.{key}", getattr(self.kd, key), "a number >= 0")


def _import_function(target: str, key: str) -> Any:
    import importlib

    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"config key '{key}': cannot import '{target}' ({err})") from None
    require(callable(fn), key, target, "a callable")
    return fn


@dataclasses.dataclass
class RunConfig:
    """The sections every training command shares (the engine reads only these); each command's config
    adds its own data, evaluation and task sections."""

    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def validate(self) -> RunConfig:
        require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")
        validate_sections(self)
        self.mesh.check_pipeline(self.model.layers)
        self.optimizer.warn_unreached_phases(self.train.steps)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Config(RunConfig):
    """`python -m jaxllm.train`'s config: the shared sections and pretraining's data, evaluation,
    curriculum, random-LTD and compression sections."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    random_ltd: RandomLTDConfig = dataclasses.field(default_factory=RandomLTDConfig)
    compression: CompressionConfig = dataclasses.field(default_factory=CompressionConfig)

    def validate(self) -> Config:
        super().validate()
        require(self.data.seq_len <= self.model.max_len, "data.seq_len", self.data.seq_len,
                 f"at most model.max_len={self.model.max_len}")
        self.random_ltd.check(self.model.layers, self.data.seq_len)
        if self.curriculum.enabled:
            from jaxllm.data.curriculum import SEQLEN_METRICS, check_seqlen_schedule

            for name in set(self.curriculum.curriculum_metrics) & set(SEQLEN_METRICS):
                check_seqlen_schedule(self.curriculum.schedule(name), self.data.seq_len,
                                      f"curriculum.curriculum_metrics.{name}")
        return self

def validate_sections(config: Any) -> None:
    """Runs the `validate` of every section of a command's root config (`Config`, `RLHFConfig`, ...);
    the root's own cross-section checks follow it."""
    for field in dataclasses.fields(config):
        section = getattr(config, field.name)
        if hasattr(section, "validate"):
            section.validate()


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raises the config error for `key` unless `ok`: what was found and what is allowed."""
    if not ok:
        raise UserError(f"config key '{key}': got {value!r}; expected {allowed}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against a field's type, allowing only lossless conversions (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise UserError(f"config key '{key}': got {value!r}; expected one of {', '.join(map(repr, choices))}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(annotation)
            return [_coerce(f"{key}[{i}]", item, inner) for i, item in enumerate(value)]
        raise UserError(f"config key '{key}': got {value!r}; expected a list")
    else:
        raise TypeError(f"unsupported config annotation {annotation!r} for {key}")
    raise UserError(f"config key '{key}': got {value!r} ({type(value).__name__}); expected {annotation.__name__}")


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[field.name]):
            keys.extend(_known_keys(hints[field.name], name + "."))
    return keys


def _unknown_key(key: str, root: type) -> UserError:
    close = difflib.get_close_matches(key, _known_keys(root), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def build_config(root: type, values: dict[str, Any]) -> Any:
    """The dataclass tree `root` from nested `values`, strictly: an unknown key (with the closest known
    one of `root` as a hint), a wrong type or a non-mapping section is a `UserError` naming the key.
    Shared by every command's config (`jaxllm.rlhf.config`, `jaxllm.multimodal.config`)."""
    return _build(root, values, "", root)


def _build(cls: type, values: dict[str, Any], prefix: str, root: type) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config key '{prefix.rstrip('.')}': got {values!r}; expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key, root)
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key + ".", root)
        elif typing.get_origin(annotation) is dict:  # a mapping of user-chosen names to sections
            if not isinstance(value or {}, dict):
                raise UserError(f"config key '{key}': got {value!r}; expected a mapping of names to sections")
            inner = typing.get_args(annotation)[1]
            kwargs[name] = {str(k): _build(inner, v or {}, f"{key}.{k}.", root) for k, v in (value or {}).items()}
        else:
            kwargs[name] = _coerce(key, value, annotation)
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turns `["model.layers=4", "train.lr=1e-3"]` into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected section.key=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and _looks_numeric(value):  # YAML reads 3e-4 as a string
            value = float(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{part}' is a value, not a section")
        node[parts[-1]] = value
    return nested


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _numbers_from_strings(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _numbers_from_strings(v) for k, v in tree.items()}
    if isinstance(tree, str) and _looks_numeric(tree) and any(c in tree.lower() for c in "e."):
        return float(tree)
    return tree


def _check_unique_keys(node: yaml.Node | None, path: Path) -> None:
    """A key given twice in one mapping is an error: `yaml.safe_load` silently keeps the last value, so
    `model: {layers: 2, layers: 64}` would train 64 layers. Reads the composed node tree only."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            if key_node.value in seen:
                raise UserError(f"config file '{path}' line {key_node.start_mark.line + 1}: key "
                                f"'{key_node.value}' appears twice in one mapping")
            seen.add(key_node.value)
            _check_unique_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, path)


def read_yaml(path: str | Path, _named_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's values; a file with `base: OTHER.yaml` (a path relative to it) holds only what it
    changes in OTHER's values, so a recipe is its preset plus a mesh and a batch."""
    path = Path(path)
    values = _read_one_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise UserError(f"config file '{path}': 'base' must name a YAML file, got {base!r}")
    if path.resolve() in _named_by:
        raise UserError(f"config file '{path}': its 'base' chain comes back to itself")
    return _merge(read_yaml(path.parent / base, (*_named_by, path.resolve())), values)


def _read_one_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserError(f"config file '{path}' is a directory; expected a YAML file")
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file '{path}': expected a mapping at the top level, got {type(loaded).__name__}")
    return _numbers_from_strings(loaded)


def from_dict(values: dict[str, Any]) -> Config:
    return build_config(Config, values).validate()


def read_values(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The nested values of a YAML config (none without a path: the defaults) with `key=value` overrides
    merged over them; every command's `load` builds and validates its root config from these."""
    values = read_yaml(path) if path is not None else {}
    return _merge(values, parse_overrides(overrides or []))


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML config (or the defaults), applies `key=value` overrides and validates the result."""
    return from_dict(read_values(path, overrides))
