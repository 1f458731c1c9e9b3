"""The pretraining task's model, optimizer, state layout and loss for a config, on the training engine.

`python -m jaxllm.train` runs it; `jaxllm.interop.convert`, the benchmarks and the tests build the
same pieces through `LanguageModelTraining.build` instead of repeating them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from jaxllm import mesh as mesh_lib
from jaxllm.engine import optimizer as optimizer_lib
from jaxllm.engine.checkpoint import run_meta
from jaxllm.engine.onebit import is_onebit
from jaxllm.engine.state import StateLayout, initial_state
from jaxllm.engine.step import LossFn, make_eval_step, make_train_step
from jaxllm.losses import lm_loss_sums
from jaxllm.ltd import LTDSetup
from jaxllm.models.definition import ModelDef, init_params
from jaxllm.models.stacking import BlockSlots, abstract_in_layout, convert_blocks, is_stacked


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
        model_def = ModelDef.from_config(config.model, block_slots(config, mesh))
        opt = optimizer_lib.build(config, mesh, model_def, schedule=schedule)
        layout = opt.layout(mesh, model_def, config.mesh.zero_stage)
        return cls(config, model_def, opt, layout, functools.partial(lm_loss_sums, model_def))

    def init_state(self, params: Any = None) -> dict[str, Any]:
        """The step-0 state: `params` (an array tree, donated; one entry per block or stacked as the
        state keeps them) or a fresh initialisation from `seed`."""
        slots = self.model_def.slots
        if params is None:
            return initial_state(self.layout, self.optimizer.tx, lambda: init_params(
                self.config.model, self.config.seed, slots))
        if slots is not None and not is_stacked(params["blocks"]):
            # Not donated: the stacked arrays cannot reuse the per-block buffers (their shapes differ).
            params = jax.jit(lambda p: convert_blocks(p, None, slots, self.config.model.layers),
                             out_shardings=self.layout.state["params"])(params)
        return initial_state(self.layout, self.optimizer.tx, params)

    def load_shardings(self) -> Any:
        """The shardings to load parameters with one entry per block into (Hugging Face files, an
        earlier stage's checkpoint) before `init_state` stacks them: the state's, less the slot axis."""
        per_block = abstract_in_layout(self.layout.abstract["params"], None, self.model_def.slots,
                                       self.config.model.layers)
        return jax.tree.map(lambda a: a.sharding, per_block)

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The checkpoint meta of this task's state (`extra`: the caller's own entries)."""
        return run_meta(self.config.model, self.optimizer.signature(), **self.model_def.slots_meta(), **extra)

    def train_step(self, ltd: LTDSetup | None = None, summarize: Callable[[int], bool] | None = None) -> Callable:
        return make_train_step(self.loss, self.optimizer, self.layout, self.config.train.grad_accum, ltd, summarize)

    def eval_step(self) -> Callable:
        return make_eval_step(self.loss, self.layout.state["params"])


def block_slots(config: Any, mesh: Mesh) -> BlockSlots | None:
    """The stacked layout the state keeps the blocks' weights in: that of the pipeline with stages,
    the blocks in order with scanned layers, else none (one entry per block). Random-LTD, whose layers
    each see other tokens, and the 1-bit optimizers, whose compression is per weight tree, keep one
    entry per block (the step then stacks them itself)."""
    stages = dict(mesh.shape).get(mesh_lib.STAGE_AXIS, 1)
    ltd = getattr(config, "random_ltd", None)  # pretraining's; SFT's config has none
    if not (config.model.scan_layers or stages > 1) or (ltd is not None and ltd.enabled) or is_onebit(config):
        return None
    return BlockSlots.of(config.model.layers, mesh_lib.PipelineSettings.of(config.mesh, stages))
