"""Random layerwise token dropping (random-LTD; Yao et al., 2022, arXiv:2211.11586), as DeepSpeed does it.

For each random-LTD layer (by default every layer but the first and the last) and each batch row, a
uniformly random subset of ``r = kept_length(step)`` of the row's ``S`` tokens is kept, without
replacement and sorted ascending. The layer runs on the gathered ``[B, r, d]`` tokens and its results
are scattered back; dropped tokens skip the layer unchanged:

    y = x.at[b, idx].set(layer(x[b, idx]))

so a kept token's gradient goes through the layer and a dropped token's gradient is the identity.
Because the indices are sorted, the kept tokens stay in sequence order: a causal mask over the
gathered tokens is the causal mask over their original positions, and RoPE and ALiBi are given the
gathered (original) positions. Tokens are dropped only in training and only while ``r < S``.

The kept length follows DeepSpeed's `RandomLTDScheduler` (``fixed_linear``), called with the 0-based
global step: ``r(t) = min(max, q(floor(t / require_steps * (max - min) + min)))`` with
``q(x) = x - x % seq_per_step``. The kept positions derive from ``(seed, step)`` only
(`ltd_key`), so a resumed run draws the same tokens.

LayerToken learning rate (DeepSpeedExamples, spec section 2): a random-LTD step processes fewer
"layer-tokens", ``((S * (L - k) + r * k) // L)`` per row for ``k`` dropping layers out of ``L``. The
learning rate warms up linearly by steps, then decays (cosine) by consumed layer-tokens from the end
of warmup to the baseline's token budget, and training runs until that budget is consumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm.errors import UserError

LTD_STREAM = 0x17D  # folded into the seed so that token dropping has its own random stream


# --------------------------------------------------------------------------------------------------
# Schedule and configuration checks.

def check_ltd_schedule(config: Mapping[str, Any] | Callable, seq_len: int | None = None,
                       where: str = "random_ltd.random_ltd_schedule") -> None:
    """Raises `UserError` naming the key for an unusable `random_ltd_schedule` dict."""
    if callable(config):
        return
    if not isinstance(config, Mapping):
        raise UserError(f"{where}: got {config!r}; expected a mapping of DeepSpeed keys or a callable")
    for key in ("min_value", "max_value"):
        value = config.get(key)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}.{key}: got {value!r}; expected a positive integer")
    low, high = config["min_value"], config["max_value"]
    if low > high:
        raise UserError(f"{where}: min_value {low} exceeds max_value {high}; expected min <= max")
    if seq_len is not None and high > seq_len:
        raise UserError(f"{where}.max_value: kept length {high} exceeds the sequence length data.seq_len={seq_len}")
    kind = config.get("schedule_type")
    if kind != "fixed_linear":
        raise UserError(f"{where}.schedule_type: got {kind!r}; expected 'fixed_linear' (DeepSpeed's only type)")
    sched = config.get("schedule_config") or {}
    if not (sched.get("require_steps") or 0) > 0:
        raise UserError(f"{where}.schedule_config.require_steps: got {sched.get('require_steps')!r}; "
                        "expected a positive number of steps")
    step = sched.get("seq_per_step")
    if not (isinstance(step, (int, np.integer)) and step > 0):
        raise UserError(f"{where}.schedule_config.seq_per_step: got {step!r}; expected a positive integer")


def kept_length(config: Mapping[str, Any] | Callable[[int], int], step: int) -> int:
    """Tokens each random-LTD layer keeps at 0-based global step `step` (DeepSpeed's scheduler value).

    >>> cfg = {"min_value": 128, "max_value": 1024, "schedule_type": "fixed_linear",
    ...        "schedule_config": {"require_steps": 400, "seq_per_step": 8}}
    >>> [kept_length(cfg, t) for t in (0, 1, 200, 399, 400, 10_000)]
    [128, 128, 576, 1016, 1024, 1024]
    """
    if callable(config):
        return int(config(step))
    sched = config["schedule_config"]
    low, high = config["min_value"], config["max_value"]
    value = math.floor(float(step) / sched["require_steps"] * (high - low) + low)
    value -= value % sched["seq_per_step"]
    return int(min(value, high))


def default_layers(num_layers: int) -> tuple[int, ...]:
    """DeepSpeed's default random-LTD layers: all but the first and the last."""
    return tuple(range(1, num_layers - 1))


def check_layers(layer_ids: Sequence[int], num_layers: int, where: str = "random_ltd.random_ltd_layer_id"
                 ) -> tuple[int, ...]:
    """Sorted, distinct layer ids in ``[0, num_layers)``, or a `UserError` naming the bad id."""
    ids = tuple(int(i) for i in layer_ids)
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"{where}: layer id {bad[0]} is out of range; the model has model.layers={num_layers} "
                        f"layers, ids 0..{num_layers - 1}")
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: got {list(ids)}; expected distinct layer ids")
    if not ids:
        raise UserError(f"{where}: no layer selected; expected at least one layer id")
    return tuple(sorted(ids))


# --------------------------------------------------------------------------------------------------
# Sampling, gather and scatter.

class LTDPlan(NamedTuple):
    """What one training forward needs: which layers drop tokens and the kept positions of each."""

    layers: tuple[int, ...]  # static: model layer ids, ascending
    indices: Int[Array, "k b r"]  # kept positions per random-LTD layer and row, ascending
    implementation: str = "auto"  # attention over the kept tokens: auto | xla | pallas

    def kept(self, layer: int) -> jax.Array | None:
        """Kept positions `[b, r]` for model layer `layer`, or None if the layer keeps every token."""
        return self.indices[self.layers.index(layer)] if layer in self.layers else None


class LTDSetup(NamedTuple):
    """The static part of random-LTD a train step is built with."""

    layers: tuple[int, ...]
    seed: int
    implementation: str = "auto"


def ltd_key(seed: int, step: jax.Array | int) -> jax.Array:
    """The PRNG key of step `step`'s token sampling: a function of the seed and the step only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), LTD_STREAM), step)


def sample_kept_indices(key: jax.Array, num_layers: int, batch: int, seq_len: int, kept: int
                        ) -> Int[Array, "k b r"]:
    """For each of `num_layers` layers and `batch` rows, `kept` of `seq_len` positions, uniformly without
    replacement, sorted ascending (the top-`kept` of i.i.d. uniforms is a uniform random subset)."""
    if not 0 < kept <= seq_len:
        raise UserError(f"random-LTD: kept length {kept} must lie in [1, sequence length {seq_len}]")
    scores = jax.random.uniform(key, (num_layers, batch, seq_len))
    _, idx = jax.lax.top_k(scores, kept)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def gather_tokens(x: Float[Array, "b s ..."], idx: Int[Array, "b r"]) -> Float[Array, "b r ..."]:
    """``x[b, idx[b]]`` for every row b."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter_tokens(x: Float[Array, "b s ..."], idx: Int[Array, "b r"], y: Float[Array, "b r ..."]
                   ) -> Float[Array, "b s ..."]:
    """`x` with ``x[b, idx[b]]`` replaced by `y`; gradients: `y` gets its rows, `x` all other positions."""
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, idx].set(y.astype(x.dtype), unique_indices=True, indices_are_sorted=True)


def dropped_layer(layer: Callable[..., jax.Array], x: Float[Array, "b s d"], positions: Int[Array, "b s"],
                  segment_ids: Int[Array, "b s"], idx: Int[Array, "b r"]) -> Float[Array, "b s d"]:
    """Runs ``layer(x_kept, positions_kept, segment_ids_kept, idx)`` on the kept tokens and scatters back."""
    y = layer(gather_tokens(x, idx), gather_tokens(positions, idx), gather_tokens(segment_ids, idx), idx)
    return scatter_tokens(x, idx, y)


# --------------------------------------------------------------------------------------------------
# LayerToken schedule and the token budget.

def layer_tokens_per_row(seq_len: int, kept: int | None, num_layers: int, ltd_layers: int) -> int:
    """Layer-tokens of one row averaged over layers: ``(S * (L - k) + r * k) // L``; r = S when not dropping."""
    r = seq_len if kept is None else min(kept, seq_len)
    return (seq_len * (num_layers - ltd_layers) + r * ltd_layers) // num_layers


class TokenBudget(NamedTuple):
    """Consumed tokens before each step, for a run that stops when `budget` tokens are consumed."""

    budget: int
    consumed: np.ndarray  # int64 [total_steps + 1]: consumed[t] = tokens of steps 0 .. t - 1
    total_steps: int


def token_budget(tokens_per_step: Callable[[int], int], budget: int, max_steps: int = 100_000_000) -> TokenBudget:
    """Steps until `budget` tokens are consumed, given each step's tokens (a pure function of the step)."""
    if budget <= 0:
        raise UserError(f"token budget: got {budget}; expected a positive number of tokens")
    consumed = [0]
    while consumed[-1] < budget:
        step = len(consumed) - 1
        tokens = int(tokens_per_step(step))
        if tokens <= 0:
            raise UserError(f"token budget: step {step} consumes {tokens} tokens; expected a positive number")
        consumed.append(consumed[-1] + tokens)
        if step >= max_steps:
            raise UserError(f"token budget: {budget} tokens need more than {max_steps} steps")
    return TokenBudget(budget, np.asarray(consumed, np.int64), len(consumed) - 1)


def layer_token_schedule(peak: float, warmup_steps: int, min_ratio: float, budget: TokenBudget,
                         decay: str = "cosine") -> Callable[[jax.Array], jax.Array]:
    """Learning rate at a 0-based step: linear warm-up by steps, then decay by consumed tokens.

    ``lr(t) = peak * t / warmup`` for ``t < warmup``; afterwards, with
    ``p = clip((consumed[t] - consumed[warmup]) / (budget - consumed[warmup]), 0, 1)``,
    ``lr = min + (peak - min) * (1 + cos(pi p)) / 2`` (cosine) or ``peak - (peak - min) * p`` (linear),
    ``min = peak * min_ratio``. With a constant ``B * S`` tokens per step this is exactly
    `jaxllm.optim.warmup_cosine(peak, warmup, budget / (B * S), min_ratio)`.
    """
    if decay not in ("cosine", "linear"):
        raise UserError(f"random_ltd.layer_token_lr_schedule.decay: got {decay!r}; expected cosine or linear")
    consumed = budget.consumed.astype(np.float64)
    start = consumed[min(warmup_steps, budget.total_steps)]
    span = max(budget.budget - start, 1.0)
    progress = jnp.asarray(np.clip((consumed - start) / span, 0.0, 1.0), jnp.float32)
    low = peak * min_ratio

    def schedule(step):
        step = jnp.asarray(step)
        p = progress[jnp.clip(step, 0, progress.shape[0] - 1)]
        if decay == "cosine":
            decayed = low + (peak - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        else:
            decayed = peak - (peak - low) * p
        if warmup_steps == 0:
            return decayed
        return jnp.where(step < warmup_steps, peak * step / warmup_steps, decayed)

    return schedule
