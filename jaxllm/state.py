"""The training state as a plain pytree, its shardings, and the bridge to the NNX model.

The state is `{"step", "params", "opt_state", "skipped_steps"}` with `params` a pure dict of f32
arrays (what Orbax saves). `ModelDef` holds the NNX graph definition and rebuilds the module from a
params dict inside `jax.jit`, so the step stays a pure function of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import mesh as mesh_lib
from jaxllm.config import ModelConfig
from jaxllm.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Everything static about a model: its graph, the params tree template and logical axes."""

    graphdef: Any
    template: Any  # nnx.State of abstract Params, updated in place by `bind`
    logical_axes: Any  # pure dict of logical-axis tuples, same structure as params
    shapes: Any  # pure dict of shapes

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelDef:
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, template = nnx.split(abstract, nnx.Param)
        logical, shapes = {}, {}
        for path, variable in nnx.to_flat_state(template):
            _set_path(logical, path, tuple(variable.logical_axes))
            _set_path(shapes, path, tuple(variable.shape))
        return cls(graphdef, template, logical, shapes)

    def bind(self, params: Any) -> Decoder:
        """The NNX module for a params dict (works on tracers inside `jit`)."""
        state = jax.tree.map(lambda x: x, self.template, is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def _set_path(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_params(cfg: ModelConfig, seed: int) -> Any:
    return nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(params=seed)), nnx.Param))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _opt_state_shardings(mesh: Mesh, model: ModelDef, abstract_opt: Any, drop) -> Any:
    """Shards every optimizer leaf that mirrors a parameter like that parameter; replicates the rest.

    A leaf mirrors a parameter when its key path ends with the parameter's path and shapes agree, which
    holds for any optax chain (Adam moments, error-feedback buffers, ...).
    """
    by_path = {}
    for path, axes in jax.tree_util.tree_flatten_with_path(model.logical_axes, is_leaf=_is_axes)[0]:
        by_path[tuple(path)] = axes
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            axes = by_path.get(path[start:])
            if axes is not None and len(axes) == len(leaf.shape):
                return NamedSharding(mesh, mesh_lib.logical_to_spec(axes, leaf.shape, mesh, drop))
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shardings of the training state and of the gradients for one mesh and ZeRO stage."""

    state: Any
    grads: Any
    abstract: Any  # ShapeDtypeStructs carrying `state` shardings (Orbax restore target)


def state_layout(mesh: Mesh, model: ModelDef, tx: optax.GradientTransformation, zero_stage: int) -> StateLayout:
    params_abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), model.shapes,
                                   is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "step": replicated,
        "skipped_steps": replicated,
        "params": mesh_lib.tree_shardings(mesh, model.logical_axes, model.shapes,
                                          mesh_lib.param_drop(zero_stage)),
        "opt_state": _opt_state_shardings(mesh, model, opt_abstract, mesh_lib.opt_drop(zero_stage)),
    }
    grads = mesh_lib.tree_shardings(mesh, model.logical_axes, model.shapes, mesh_lib.grad_drop(zero_stage))
    abstract_tree = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                     "skipped_steps": jax.ShapeDtypeStruct((), jnp.int32),
                     "params": params_abstract, "opt_state": opt_abstract}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree,
                            shardings)
    return StateLayout(shardings, grads, abstract)


def create_state(cfg: ModelConfig, seed: int, tx: optax.GradientTransformation, layout: StateLayout) -> Any:
    """Initialises parameters and optimizer state directly into their shards."""

    def init():
        params = init_params(cfg, seed)
        return {"step": jnp.zeros((), jnp.int32), "skipped_steps": jnp.zeros((), jnp.int32),
                "params": params, "opt_state": tx.init(params)}

    return jax.jit(init, out_shardings=layout.state)()
