"""`ModelDef`: the static half of an NNX model, so a train step stays a pure function of arrays.

`nnx.split` separates a module into its graph definition and its parameters. jaxllm keeps the
parameters as a pure dict of f32 arrays (what Orbax saves and what shardings are laid over) and
`ModelDef.bind(params)` rebuilds the module from such a dict inside `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.models.stacking import BlockSlots


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Everything static about a model: its graph, the params tree template and logical axes."""

    graphdef: Any
    template: Any  # nnx.State of abstract Params, copied by `bind`
    logical_axes: Any  # pure dict of logical-axis tuples, same structure as params
    shapes: Any  # pure dict of shapes
    slots: BlockSlots | None = None  # the layout of stacked block weights (`jaxllm.models.stacking`)

    @classmethod
    def from_module(cls, make: Callable[[], nnx.Module]) -> ModelDef:
        """The definition of the module `make()` builds, without allocating its parameters. Every
        parameter must carry `logical_axes` (see `jaxllm.mesh`)."""
        graphdef, template = nnx.split(nnx.eval_shape(make), nnx.Param)
        logical, shapes = {}, {}
        for path, variable in nnx.to_flat_state(template):
            _set_path(logical, path, tuple(variable.logical_axes))
            _set_path(shapes, path, tuple(variable.shape))
        return cls(graphdef, template, logical, shapes)

    @classmethod
    def from_config(cls, cfg: ModelConfig, slots: BlockSlots | None = None) -> ModelDef:
        """The decoder language model of `cfg` (its blocks' weights stacked in layout `slots`)."""
        return dataclasses.replace(cls.from_module(lambda: Decoder(cfg, rngs=nnx.Rngs(0), slots=slots)), slots=slots)

    def slots_meta(self) -> dict[str, Any]:
        """The checkpoint meta entry naming the stacked layout (`block_slots`); none without one."""
        return {} if self.slots is None else {"block_slots": list(self.slots.layer)}

    def bind(self, params: Any) -> Any:
        """The NNX module for a params dict (works on tracers inside `jit`)."""
        state = jax.tree.map(lambda x: x, self.template, is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def _set_path(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_params(cfg: ModelConfig, seed: int, slots: BlockSlots | None = None) -> Any:
    """Freshly initialised decoder parameters as a pure dict (the blocks stacked in layout `slots`)."""
    return nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(params=seed), slots=slots), nnx.Param))
