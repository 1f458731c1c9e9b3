"""The pretraining task's model, optimizer, state layout and loss for a config, on the training engine.

`python -m jaxllm.train` runs it; `jaxllm.interop.convert`, the benchmarks and the tests build the
same pieces through `LanguageModelTraining.build` instead of repeating them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import optax
from jax.sharding import Mesh

from jaxllm.engine import optimizer as optimizer_lib
from jaxllm.engine.state import StateLayout, initial_state
from jaxllm.engine.step import LossFn, make_eval_step, make_train_step
from jaxllm.losses import lm_loss_sums
from jaxllm.ltd import LTDSetup
from jaxllm.models.definition import ModelDef, init_params


@dataclasses.dataclass(frozen=True)
class LanguageModelTraining:
    """A decoder trained on next-token cross-entropy with the config's optimizer."""

    config: Any
    model_def: ModelDef
    optimizer: optimizer_lib.TrainOptimizer
    layout: StateLayout
    loss: LossFn

    @classmethod
    def build(cls, config: Any, mesh: Mesh, schedule: optax.Schedule | None = None) -> LanguageModelTraining:
        """Call under `jax.set_mesh(mesh)`. `schedule` replaces the config's learning rate."""
        model_def = ModelDef.from_config(config.model)
        opt = optimizer_lib.build(config, mesh, model_def, schedule=schedule)
        layout = opt.layout(mesh, model_def, config.mesh.zero_stage)
        return cls(config, model_def, opt, layout, functools.partial(lm_loss_sums, model_def))

    def init_state(self, params: Any = None) -> dict[str, Any]:
        """The step-0 state: `params` (an array tree, donated) or a fresh initialisation from `seed`."""
        if params is None:
            return initial_state(self.layout, self.optimizer.tx, lambda: init_params(self.config.model,
                                                                                     self.config.seed))
        return initial_state(self.layout, self.optimizer.tx, params)

    def train_step(self, ltd: LTDSetup | None = None, summarize: Callable[[int], bool] | None = None) -> Callable:
        return make_train_step(self.loss, self.optimizer, self.layout, self.config.train.grad_accum, ltd, summarize)

    def eval_step(self) -> Callable:
        return make_eval_step(self.loss, self.layout.state["params"])
