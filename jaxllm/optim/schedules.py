"""Learning-rate schedules: pure functions of the step."""

from __future__ import annotations

import optax


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `peak * min_ratio`
    at `total_steps` (held there afterwards)."""
    decay_steps = max(total_steps - warmup_steps, 1)
    cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=min_ratio)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])
