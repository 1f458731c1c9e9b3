"""The per-step plan of a run with curriculum learning and/or random-LTD: what `jaxllm.train` asks each step.

`DataEfficiency.from_config(config, ...)` reads the `curriculum:` and `random_ltd:` sections and answers,
as pure functions of the 0-based training step:

* `seq_len(step)`: the row length after a sequence-length curriculum (`seqlen_truncate` or
  `seqlen_reshape`; the difficulty of scheduler step ``step + 1``, DeepSpeed's convention);
* `kept(step)`: the random-LTD kept length (DeepSpeed's scheduler at ``step``), or None when no token
  is dropped (random-LTD off, or ``r >= seq_len(step)``);
* `prepare(batch, step)`: the host batch with the curriculum's length applied;
* `tokens(step)`: the tokens step ``step`` trains on, and with a token budget (`curriculum.token_budget`
  or `random_ltd.layer_token_lr_schedule.enabled`) `total_steps` and the LayerToken learning-rate
  schedule: the run consumes the baseline's ``train.steps * batch * seq_len`` (layer-)tokens.

Batch shapes only change when a difficulty changes, and difficulties are multiples of the schedule's
`difficulty_step` / `seq_per_step`, so the train step compiles once per distinct (length, kept length)
pair: `compilations_bound(steps)` counts them in advance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm import ltd as ltd_lib
from jaxllm.config import Config
from jaxllm.data import curriculum as cl
from jaxllm.errors import UserError


@dataclasses.dataclass
class DataEfficiency:
    config: Config
    seqlen_metric: str | None  # seqlen_truncate | seqlen_reshape | None
    seqlen_schedule: Any
    cluster_metrics: dict[str, Any]  # metrics the sampler clusters by (with any single_cluster ones)
    ltd_layers: tuple[int, ...]
    ltd_schedule: Any
    row_multiple: int  # folded rows (seqlen_reshape) are rounded to a multiple of this (global)
    budget: ltd_lib.TokenBudget | None = None

    @classmethod
    def from_config(cls, config: Config, row_multiple: int = 1) -> DataEfficiency | None:
        """The plan, or None when neither curriculum nor random-LTD is enabled."""
        cur, rl = config.curriculum, config.random_ltd
        if not cur.enabled and not rl.enabled:
            return None
        seqlen_metric, seqlen_schedule, cluster = None, None, {}
        if cur.enabled:
            for name in cur.curriculum_metrics:
                schedule = cur.schedule(name)
                if name in cl.SEQLEN_METRICS:
                    seqlen_metric, seqlen_schedule = name, schedule
                else:
                    cluster[name] = schedule
        layers = rl.layer_ids(config.model.layers) if rl.enabled else ()
        plan = cls(config, seqlen_metric, seqlen_schedule, cluster, layers,
                   rl.schedule() if rl.enabled else None, row_multiple)
        if cur.token_budget or (rl.enabled and rl.layer_token_lr_schedule.enabled):
            baseline = config.train.steps * config.train.batch_size * config.data.seq_len
            plan.budget = ltd_lib.token_budget(plan.layer_tokens, baseline)
        return plan

    # Per-step quantities ---------------------------------------------------------------------------

    def seq_len(self, step: int) -> int:
        if self.seqlen_metric is None:
            return self.config.data.seq_len
        return min(cl.difficulty_for_batch(self.seqlen_schedule, step), self.config.data.seq_len)

    def rows(self, step: int) -> int:
        """Global rows of step `step`'s batch (more than train.batch_size when seqlen_reshape folds rows)."""
        batch, full = self.config.train.batch_size, self.config.data.seq_len
        length = self.seq_len(step)
        if self.seqlen_metric != "seqlen_reshape" or length >= full:
            return batch
        return cl.reshape_rows(batch, full, length, self.row_multiple)[1]

    def kept(self, step: int) -> int | None:
        if not self.ltd_layers:
            return None
        r = ltd_lib.kept_length(self.ltd_schedule, step)
        return r if r < self.seq_len(step) else None

    def tokens(self, step: int) -> int:
        """Tokens (rows x length) that step `step` trains on."""
        return self.rows(step) * self.seq_len(step)

    def layer_tokens(self, step: int) -> int:
        """Tokens counted by the LayerToken rule: rows x ((S (L - k) + r k) // L)."""
        kept = self.kept(step)
        per_row = ltd_lib.layer_tokens_per_row(self.seq_len(step), kept, self.config.model.layers,
                                               len(self.ltd_layers) if kept is not None else 0)
        return self.rows(step) * per_row

    @property
    def total_steps(self) -> int:
        return self.config.train.steps if self.budget is None else self.budget.total_steps

    def lr_schedule(self):
        """The LayerToken schedule (token budget) or None to keep the optimizer's step schedule."""
        if self.budget is None:
            return None
        t, rl = self.config.train, self.config.random_ltd
        decay = rl.layer_token_lr_schedule.decay if rl.enabled else "cosine"
        return ltd_lib.layer_token_schedule(t.lr, t.warmup_steps, t.min_lr_ratio, self.budget, decay)

    def compilations_bound(self, steps: int | None = None) -> int:
        """Distinct (rows, length, kept) train-step signatures over the run: its compilations."""
        steps = self.total_steps if steps is None else steps
        return len({(self.rows(t), self.seq_len(t), self.kept(t)) for t in range(steps)})

    # Data ------------------------------------------------------------------------------------------

    def prepare(self, batch: dict[str, np.ndarray], step: int, local_row_multiple: int = 1) -> dict[str, np.ndarray]:
        """The host batch with step `step`'s curriculum length applied."""
        if self.seqlen_metric is None:
            return batch
        return cl.apply_seqlen(batch, self.seqlen_metric, self.seq_len(step), local_row_multiple)

    def uses_sampler(self) -> bool:
        return bool(self.cluster_metrics)

    def make_iterator(self, train_rows, shard_dir: Path | None, slot: int, slots: int):
        """The curriculum sampler's iterator over `train_rows` (rows of the token shards in `shard_dir`)."""
        from jaxllm.data.analyze import dataset_fingerprint, open_metric_index
        from jaxllm.data.curriculum_sampler import ClusterSampler, CurriculumIterator

        if shard_dir is None:
            raise UserError("config key 'curriculum.curriculum_metrics': metrics other than seqlen_truncate / "
                            "seqlen_reshape need token data (data.source tokens or text) analyzed by "
                            "python -m jaxllm.data.analyze; data.source is synthetic")
        fingerprint = dataset_fingerprint(shard_dir, self.config.data.seq_len)
        indexes = {}
        metrics = dict(self.cluster_metrics)
        for name in self.cluster_metrics:
            metric = self.config.curriculum.curriculum_metrics[name]
            if metric.clustering_type == "schedule_based":
                indexes[name] = open_metric_index(metric.index_to_sample_path, fingerprint,
                                                  f"config key 'curriculum.curriculum_metrics.{name}"
                                                  ".index_to_sample_path'")
        if self.seqlen_metric is not None:  # a single_cluster metric: new clusters when it changes, as DeepSpeed
            metrics[self.seqlen_metric] = self.seqlen_schedule
        seed = self.config.seed if self.config.curriculum.seed is None else self.config.curriculum.seed
        sampler = ClusterSampler(metrics, indexes, len(train_rows), self.config.train.batch_size, seed)
        return CurriculumIterator(train_rows, sampler, slot, slots)
