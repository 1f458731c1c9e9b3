"""The curriculum data sampler: global batches drawn from difficulty clusters, as DeepSpeed's sampler does.

DeepSpeed's `DeepSpeedDataSampler` (spec section 3), restated for a Grain pipeline:

1. Before global batch ``s`` (``s = 1, 2, ...``) every metric's difficulty is updated with
   `schedule_value(metric, s)`. When any difficulty changed, a new *cluster* of samples is made:
   with one clustering metric, the samples whose value lies in ``(previous, current]``
   (``difficulty_type: value``) or whose rank lies in ``[spp * previous, spp * current)`` with
   ``spp = N // max_difficulty`` (``percentile``); with several, the samples within
   ``(-inf, current]`` (or ``[0, current)``) of every metric, minus all older clusters. A cluster
   with no sample is skipped. ``single_cluster`` metrics (``seqlen_*``) need no index: they
   contribute every sample.
2. Each of the ``B`` samples of the batch picks a cluster with probability proportional to the
   cluster's size (with replacement); each cluster is read sequentially in a shuffled order and is
   reshuffled when exhausted; the batch is shuffled.

The draws come from NumPy generators derived from ``(seed, step)`` and ``(seed, cluster, epoch)``
rather than from one stateful stream, so the sampler state is a few integers (step, each cluster's
read position and epoch) that Grain checkpoints as JSON with the model, and clusters are rebuilt from
the schedules on restore. A cluster smaller than what a batch asks of it wraps as often as needed, so
every batch is full. Samples are rows ``0 .. num_samples - 1`` of the training source; rows past it (the
held-out evaluation rows at the end of the data) are never drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from jaxllm.data.analyze import MetricIndex
from jaxllm.data.curriculum import schedule_value
from jaxllm.data.pipeline import RowSource, stack_rows
from jaxllm.errors import UserError


class ClusterSampler:
    """Sample indices of each global batch under a multi-metric curriculum (see the module docstring).

    Args:
      metrics: metric name -> DeepSpeed metric config (``min_difficulty``, ``max_difficulty``,
        ``schedule_type``, ``schedule_config``, ``difficulty_type``, ``clustering_type``), or a
        callable schedule for a ``single_cluster`` metric.
      indexes: metric name -> `MetricIndex`, for every metric that is not ``single_cluster``.
      num_samples: training rows; indices are drawn from ``[0, num_samples)``.
      batch_size: global batch size.
      seed: DeepSpeed's ``data_efficiency.seed``.
    """

    def __init__(self, metrics: Mapping[str, Any], indexes: Mapping[str, MetricIndex], num_samples: int,
                 batch_size: int, seed: int):
        if num_samples <= 0 or batch_size <= 0:
            raise UserError(f"curriculum sampler: got {num_samples} samples and batch size {batch_size}; "
                            "expected positive numbers")
        self.metrics = dict(metrics)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.clustering = [m for m, c in self.metrics.items() if _clustering(c) != "single_cluster"]
        self.values: dict[str, np.ndarray] = {}
        self.order: dict[str, np.ndarray] = {}
        for name in self.clustering:
            if name not in indexes:
                raise UserError(f"curriculum metric '{name}': schedule_based clustering needs its index "
                                "(index_to_sample_path)")
            index = indexes[name]
            if index.sample_to_metric.size < num_samples:
                raise UserError(f"curriculum metric '{name}': index '{index.directory}' covers "
                                f"{index.sample_to_metric.size} samples but training reads {num_samples}")
            self.values[name] = index.sample_to_metric[:num_samples].astype(np.int64)
            order = index.index_to_sample.astype(np.int64)
            self.order[name] = order[order < num_samples]
        self._reset()

    def _reset(self) -> None:
        self.step = 0
        self.difficulties: dict[str, int] = {}
        self.history: list[dict[str, int]] = []  # difficulties at each cluster attempt
        self.clusters: list[np.ndarray] = []
        self.positions: list[int] = []
        self.epochs: list[int] = []
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # Clusters ------------------------------------------------------------------------------------

    def _members(self, name: str, low: float, high: int) -> np.ndarray:
        config = self.metrics[name]
        if config.get("difficulty_type", "value") == "percentile":
            order = self.order[name]
            per = order.size // config["max_difficulty"]
            start = per * int(low)
            stop = order.size if high >= config["max_difficulty"] else per * high
            return np.sort(order[start:stop])
        values = self.values[name]
        return np.nonzero((values > low) & (values <= high))[0]

    def _floor(self, name: str) -> float:
        return 0 if self.metrics[name].get("difficulty_type", "value") == "percentile" else -np.inf

    def _new_cluster(self, previous: Mapping[str, float]) -> None:
        self.history.append(dict(self.difficulties))
        if len(self.clustering) > 1:
            members = np.arange(self.num_samples)
            for name in self.clustering:
                members = np.intersect1d(members, self._members(name, self._floor(name), self.difficulties[name]),
                                         assume_unique=True)
            for cluster in self.clusters:
                members = np.setdiff1d(members, cluster, assume_unique=True)
        elif self.clustering:
            name = self.clustering[0]
            members = self._members(name, previous[name], self.difficulties[name])
        elif not self.clusters:
            members = np.arange(self.num_samples)
        else:
            return
        if members.size:
            self.clusters.append(members)
            self.positions.append(0)
            self.epochs.append(0)

    def _permutation(self, cluster: int) -> np.ndarray:
        key = (cluster, self.epochs[cluster])
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, 0, cluster, self.epochs[cluster]])
            self._perms = {k: v for k, v in self._perms.items() if k[0] != cluster}  # one epoch per cluster
            self._perms[key] = rng.permutation(self.clusters[cluster])
        return self._perms[key]

    def _advance_difficulties(self) -> None:
        self.step += 1
        previous, changed = {}, False
        for name, config in self.metrics.items():
            value = schedule_value(config, self.step)
            if self.difficulties.get(name) != value:
                changed = True
            previous[name] = self.difficulties.get(name, self._floor(name) if name in self.clustering else 0)
            self.difficulties[name] = value
        if changed:
            self._new_cluster(previous)
        if not self.clusters:
            raise UserError(f"curriculum: no training sample is within the difficulties {self.difficulties} at "
                            f"step {self.step}; raise min_difficulty or check the metric index")

    # Batches -------------------------------------------------------------------------------------

    def next_batch(self) -> np.ndarray:
        """The sample indices of the next global batch, `[batch_size]` int64."""
        self._advance_difficulties()
        rng = np.random.default_rng([self.seed, 1, self.step])
        sizes = np.asarray([c.size for c in self.clusters], np.float64)
        picks = np.bincount(rng.choice(len(self.clusters), self.batch_size, replace=True, p=sizes / sizes.sum()),
                            minlength=len(self.clusters))
        batch = []
        for cluster, count in enumerate(picks):
            while count:
                perm = self._permutation(cluster)
                take = perm[self.positions[cluster]:self.positions[cluster] + count]
                batch.append(take)
                count -= take.size
                self.positions[cluster] += take.size
                if self.positions[cluster] >= perm.size:
                    self.positions[cluster] = 0
                    self.epochs[cluster] += 1
        batch = np.concatenate(batch)
        rng.shuffle(batch)
        return batch

    # Checkpointing -------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "positions": list(self.positions), "epochs": list(self.epochs),
                "history": [dict(h) for h in self.history]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Rebuilds the clusters by replaying the schedules up to the saved step, then restores positions."""
        self._reset()
        for _ in range(int(state["step"])):
            self._advance_difficulties()
        if self.history != [dict(h) for h in state["history"]] or len(self.clusters) != len(state["positions"]):
            raise UserError("curriculum: the checkpoint's data-sampler state does not match this config's curriculum "
                            "schedules (clusters differ); resume with the config the run started with")
        self.positions = [int(p) for p in state["positions"]]
        self.epochs = [int(e) for e in state["epochs"]]


def _clustering(config: Any) -> str:
    return "single_cluster" if callable(config) else config.get("clustering_type", "schedule_based")


class CurriculumIterator(grain.DatasetIterator):
    """This process's batches of the rows a `ClusterSampler` picks; checkpointable with Grain.

    Process slot `slot` of `slots` takes rows ``[round(slot * B / slots), round((slot + 1) * B / slots))``
    of each global batch, as DeepSpeed splits a batch between data-parallel ranks.
    """

    def __init__(self, source: RowSource, sampler: ClusterSampler, slot: int = 0, slots: int = 1):
        super().__init__()
        self.source, self.sampler, self.slot, self.slots = source, sampler, slot, slots

    def __next__(self) -> dict[str, np.ndarray]:
        indices = self.sampler.next_batch()
        size = indices.size
        mine = indices[round(self.slot * size / self.slots):round((self.slot + 1) * size / self.slots)]
        return stack_rows([self.source[int(i)] for i in mine])

    @property
    def difficulties(self) -> dict[str, int]:
        return dict(self.sampler.difficulties)

    def get_state(self) -> dict[str, Any]:
        return self.sampler.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.sampler.set_state(state)
