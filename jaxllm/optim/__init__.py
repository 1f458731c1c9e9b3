"""Optax optimizers and schedules; `build_optimizer(config)` turns the config into a transform."""

from __future__ import annotations

import jax
import optax

from jaxllm.config import Config
from jaxllm.optim.schedules import warmup_cosine


def _decay_mask(params):
    """Weight decay applies to matrices (projections, embeddings), not to norms and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(config: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain for `config.optimizer` and the learning-rate schedule it follows."""
    opt, train = config.optimizer, config.train
    schedule = warmup_cosine(train.lr, train.warmup_steps, train.steps, train.min_lr_ratio)
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=_decay_mask)
    else:  # the config's Literal type already rejected other names
        raise AssertionError(f"optimizer {opt.name!r} passed validation but has no builder")
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    return optax.chain(clip, core), schedule


__all__ = ["build_optimizer", "warmup_cosine"]
