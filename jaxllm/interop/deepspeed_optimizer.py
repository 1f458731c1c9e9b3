"""DeepSpeed's `optimizer` and `scheduler` sections -> jaxllm's `optimizer`, `train.lr` and schedule keys
(`jaxllm.interop.deepspeed`).

DeepSpeed's (torch's) optimizer defaults are written out, since jaxllm's differ (b2=0.95,
weight_decay=0.1); "auto" leaves the command line's or jaxllm's value and is reported. DeepSpeed's
schedules map onto jaxllm's one schedule: linear warm-up from 0 to `train.lr`, then cosine decay to
`train.lr * train.min_lr_ratio` at `train.steps`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxllm import config as config_lib
from jaxllm.errors import UserError
from jaxllm.interop.deepspeed_translation import AUTO, Translation, mapping, number, typed

OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "onebitadam": "onebit_adam", "zerooneadam": "zero_one_adam",
              "onebitlamb": "onebit_lamb"}
# Optimizer switches whose value, when equal to this, is what jaxllm's AdamW (Optax) does anyway.
SAME_AS_ADAMW = {"bias_correction": True, "amsgrad": False, "torch_adam": False}
ONEBIT_ONLY = {
    "fused": "XLA fuses the update itself",
    "cuda_aware": "collectives are XLA's; there is no CUDA-aware MPI switch",
    "comm_backend_name": "collectives are XLA's (NCCL/ICI chosen by JAX)",
}
def translate_optimizer(ds: Mapping[str, Any], out: Translation) -> float | None:
    """The optimizer section; returns its learning rate (the scheduler may override it)."""
    section = mapping(ds, "optimizer")
    kind = typed(section.get("type"), str, "optimizer.type", "a string such as 'AdamW'")
    name = OPTIMIZERS.get(kind.lower().replace("_", ""))
    if name is None:
        raise UserError(f"DeepSpeed config 'optimizer.type': got {kind!r}; jaxllm supports "
                        "Adam, AdamW, OneBitAdam, ZeroOneAdam, OneBitLamb")
    params = typed(section.get("params", {}), dict, "optimizer.params", "an object")
    out.set("optimizer.name", name)
    # DeepSpeed's (torch's) defaults, written out so jaxllm's own defaults (b2=0.95, weight_decay=0.1)
    # do not change the run; "auto" leaves jaxllm's (or the command line's) values.
    betas = params.get("betas", [0.9, 0.999])
    if betas == AUTO:
        out.auto("optimizer.params.betas", "optimizer.b1")
        out.auto("optimizer.params.betas", "optimizer.b2")
    elif isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas):
        out.set("optimizer.b1", float(betas[0]))
        out.set("optimizer.b2", float(betas[1]))
    else:
        raise UserError(f"DeepSpeed config 'optimizer.params.betas': got {betas!r}; expected [beta1, beta2] or "
                        "\"auto\"")
    for key, dotted, default in (("eps", "optimizer.eps", 1e-8), ("weight_decay", "optimizer.weight_decay", 0.0)):
        value = number(params, key, "optimizer.params", out, dotted, default)
        if value is not None:
            out.set(dotted, value)
    decay = out.config["optimizer"].get("weight_decay")
    if kind.lower() == "adam" and not params.get("adam_w_mode", True) and decay:
        out.note("optimizer.params.adam_w_mode", "approximate: jaxllm always decouples weight decay (AdamW); "
                 "false (L2 penalty in the gradient) is not available")
    allowed = config_lib.ONEBIT_PARAMS[name]
    for key in sorted(set(params) - {"lr", "betas", "eps", "weight_decay", "adam_w_mode"}):
        path = f"optimizer.params.{key}"
        if key in allowed:
            out.set(f"optimizer.{key}", typed(params[key], (int, float), path, "a number"))
        elif key in ONEBIT_ONLY:
            out.note(path, ONEBIT_ONLY[key])
        elif key == "bias_correction" and name != "adamw":
            _onebit_bias_correction(name, typed(params[key], bool, path, "true or false"), out)
        elif key in SAME_AS_ADAMW and params[key] == SAME_AS_ADAMW[key]:
            continue  # the value describes what jaxllm does anyway
        elif key in SAME_AS_ADAMW:
            out.note(path, f"{params[key]!r} is not available: jaxllm's AdamW runs with {SAME_AS_ADAMW[key]!r}")
        else:
            takes = ", ".join((*allowed, "lr", "betas", "eps", "weight_decay"))
            out.note(path, f"not a parameter of jaxllm's {name} (it takes {takes})")
    return number(params, "lr", "optimizer.params", out, "train.lr")


def _onebit_bias_correction(name: str, value: bool, out: Translation) -> None:
    """DeepSpeed's 1-bit optimizers accept `bias_correction` but their update never applies it, so
    jaxllm's `optimizer.bias_correction: false` (no correction) is what a DeepSpeed run does either way."""
    if name != "onebit_lamb":
        out.set("optimizer.bias_correction", False)
    if value:
        out.note("optimizer.params.bias_correction", f"true is not applied by DeepSpeed's {name} update, so "
                 "optimizer.bias_correction stays false as DeepSpeed runs; true is jaxllm's option "
                 "(onebit_adam, zero_one_adam)")


def translate_scheduler(ds: Mapping[str, Any], out: Translation, lr: float | None) -> float | None:
    """DeepSpeed schedules onto jaxllm's one schedule: linear warm-up from 0 to train.lr, then cosine decay
    to train.lr * train.min_lr_ratio at train.steps. Returns the peak learning rate."""
    section = mapping(ds, "scheduler")
    kind = typed(section.get("type"), str, "scheduler.type", "a string such as 'WarmupLR'")
    params = typed(section.get("params", {}), dict, "scheduler.params", "an object")

    def num(key: str, default: Any, dotted: str = "") -> float | None:
        if params.get(key) == AUTO and not dotted:
            raise UserError(f"DeepSpeed config 'scheduler.params.{key}': got 'auto', which nothing fills in here; "
                            "give a number")
        return number(params, key, "scheduler.params", out, dotted, default)

    if kind not in SCHEDULER_PARAMS:
        out.note("scheduler", f"{kind} has no jaxllm equivalent; the run uses warm-up + cosine decay "
                 "(train.warmup_steps, train.min_lr_ratio)")
        return lr
    for key in sorted(set(params) - SCHEDULER_PARAMS[kind]):
        reason = ("jaxllm's schedules are pure functions of the step; resuming restores the step from the "
                  "checkpoint" if key == "last_batch_iteration" else f"not a parameter of {kind}")
        out.note(f"scheduler.params.{key}", reason)
    warmup = num("warmup_num_steps", 1000, "train.warmup_steps")
    if warmup is not None:
        out.set("train.warmup_steps", int(warmup))
    if params.get("warmup_type", "log") != "linear":
        out.note("scheduler.params.warmup_type", "approximate: DeepSpeed's default warm-up is logarithmic; "
                 "jaxllm warms up linearly")
    if kind == "WarmupCosineLR":
        if num("warmup_min_ratio", 0.0):
            out.note("scheduler.params.warmup_min_ratio", "approximate: jaxllm's warm-up starts at 0")
        out.set("train.min_lr_ratio", num("cos_min_ratio", 0.0001))
        _total_steps(num("total_num_steps", None, "train.steps"), params, out)
        return lr
    if params.get("warmup_min_lr") == AUTO:
        out.note("scheduler.params.warmup_min_lr", "auto: 0, as the Hugging Face Trainer fills it in; jaxllm's "
                 "warm-up starts at 0")
    elif num("warmup_min_lr", 0.0):
        out.note("scheduler.params.warmup_min_lr", "approximate: jaxllm's warm-up starts at 0")
    peak = num("warmup_max_lr", 0.001, "train.lr")
    if kind == "WarmupLR":
        out.set("train.min_lr_ratio", 1.0)  # cosine from the peak to the peak: constant after warm-up
    else:
        out.set("train.min_lr_ratio", 0.0)
        _total_steps(num("total_num_steps", None, "train.steps"), params, out)
        out.note("scheduler.type", "approximate: WarmupDecayLR decays linearly to 0; jaxllm decays along a "
                 "cosine to 0 over the same steps")
    if peak is not None and lr is not None and lr != peak:
        out.note("optimizer.params.lr", f"overridden by scheduler.params.warmup_max_lr={peak}, as in DeepSpeed")
    return lr if peak is None else peak


_WARMUP = {"warmup_num_steps", "warmup_type"}
SCHEDULER_PARAMS = {"WarmupLR": _WARMUP | {"warmup_min_lr", "warmup_max_lr"},
                    "WarmupDecayLR": _WARMUP | {"warmup_min_lr", "warmup_max_lr", "total_num_steps"},
                    "WarmupCosineLR": _WARMUP | {"warmup_min_ratio", "cos_min_ratio", "total_num_steps"}}


def _total_steps(steps: float | None, params: Mapping[str, Any], out: Translation) -> None:
    if steps:
        out.set("train.steps", int(steps))
    elif params.get("total_num_steps") != AUTO:
        raise UserError("DeepSpeed config 'scheduler.params.total_num_steps': required (a positive integer or "
                        "\"auto\") for this schedule")
