"""The training state of any task as a plain pytree, its shardings, and its first value.

A state is `{"step", "skipped_steps", "params", "opt_state"}`, plus `"frozen"` when some top-level
parameter groups do not train (VisualChat's vision tower): `params` holds the trainable groups, the
only ones with gradients and optimizer state, and `frozen` the rest, carried unchanged in every
checkpoint; `"loss_guard"` holds the loss-spike guard's running mean when it is on
(`jaxllm.engine.loss_spike`). Parameters are pure dicts of f32 arrays (what Orbax saves).

Shardings come from the parameters' logical axes through `jaxllm.mesh`; ZeRO stages are sharding
choices (`param_drop`, `grad_drop`, `opt_drop`). Every optimizer-state leaf that mirrors a parameter
is sharded like it, for any Optax chain; a 1-bit optimizer (`jaxllm.engine.onebit`) lays out
its own per-device state. Host offload (`mesh.offload`) is a memory kind on the same shardings: the
optimizer state's leaves (and with `optimizer_and_params` the trainable parameters) live in host memory
(`pinned_host`), split over the devices as before, and the step (`jaxllm.engine.step`) streams them
through the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import mesh as mesh_lib
from jaxllm.engine import loss_spike


def is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


@dataclasses.dataclass(frozen=True)
class ParamTree:
    """What a layout needs of a model: the logical axes and shapes of its parameters (same structure).

    Any `ModelDef` is one; so is the trainable part of a model (`subset`) or a LoRA tree."""

    logical_axes: Any
    shapes: Any

    @classmethod
    def of(cls, model: Any) -> ParamTree:
        """The parameter tree of a `ModelDef` (or anything with `logical_axes` and `shapes`)."""
        return cls(model.logical_axes, model.shapes)

    def subset(self, groups: tuple[str, ...]) -> ParamTree:
        return ParamTree({k: self.logical_axes[k] for k in groups}, {k: self.shapes[k] for k in groups})

    def abstract(self) -> Any:
        """f32 `ShapeDtypeStruct`s of the parameters."""
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), self.shapes, is_leaf=is_shape)

    def shardings(self, mesh: Mesh, drop: tuple[str, ...] = ()) -> Any:
        return mesh_lib.tree_shardings(mesh, self.logical_axes, self.shapes, drop)

    def placed(self, mesh: Mesh, drop: tuple[str, ...] = ()) -> Any:
        """f32 `ShapeDtypeStruct`s carrying their shardings on `mesh` (a restore target)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract(),
                            self.shardings(mesh, drop))


def mirrored_shardings(mesh: Mesh, params: ParamTree, tree: Any, drop: tuple[str, ...]) -> Any:
    """Shards every leaf of `tree` that mirrors a parameter like that parameter; replicates the rest.

    A leaf mirrors a parameter when its key path ends with the parameter's path and shapes agree, which
    holds for any optax chain (Adam moments, error-feedback buffers, ...).
    """
    by_path = {tuple(path): axes
               for path, axes in jax.tree_util.tree_flatten_with_path(params.logical_axes, is_leaf=is_axes)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf_sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            axes = by_path.get(path[start:])
            if axes is not None and len(axes) == len(leaf.shape):
                return NamedSharding(mesh, mesh_lib.logical_to_spec(axes, leaf.shape, mesh, drop))
        return replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shardings of the training state and of the gradients for one mesh and ZeRO stage."""

    state: Any
    grads: Any
    abstract: Any  # ShapeDtypeStructs carrying `state` shardings (Orbax restore target)
    frozen: tuple[str, ...] = ()  # top-level parameter groups kept under "frozen"
    offload: str = "none"  # mesh.offload: "optimizer" places `opt_state` in host memory, "optimizer_and_params"
    # `params` too, and the step computes with a copy of them in this dtype (`jaxllm.engine.offload`)
    compute_dtype: Any = jnp.float32


def state_layout(mesh: Mesh, model: Any, tx: optax.GradientTransformation, zero_stage: int,
                 frozen: tuple[str, ...] = (), opt_state: tuple[Any, Any] | None = None,
                 buffers: Any = None, offload: str = "none", loss_guard: bool = False,
                 compute_dtype: Any = jnp.float32) -> StateLayout:
    """The layout of a task's state. `model`: a `ModelDef` or `ParamTree`; `frozen`: top-level groups
    without gradients; `opt_state`: (abstract, shardings) of an optimizer that lays out its own state
    (a 1-bit optimizer's per-device buffers), else they follow `tx.init` and the parameters;
    `buffers`: a tree of arrays the loss updates (`jaxllm.engine.step`), replicated; `offload`:
    `mesh.offload` ("optimizer": the optimizer state in host memory, "optimizer_and_params": the trainable
    parameters too); `loss_guard`: carry the loss-spike guard's scalars; `compute_dtype`: the model's,
    which the devices' copy of offloaded parameters takes."""
    whole = ParamTree(model.logical_axes, model.shapes)
    trainable = whole.subset(tuple(k for k in whole.shapes if k not in frozen)) if frozen else whole
    replicated = NamedSharding(mesh, PartitionSpec())
    params_abstract = trainable.abstract()
    if opt_state is None:
        opt_abstract = jax.eval_shape(tx.init, params_abstract)
        opt_shardings = mirrored_shardings(mesh, trainable, opt_abstract, mesh_lib.opt_drop(zero_stage))
    else:
        opt_abstract, opt_shardings = opt_state
    params_shardings = trainable.shardings(mesh, mesh_lib.param_drop(zero_stage))
    if offload != "none":
        mesh_lib.check_host_memory(mesh, "mesh.offload")
        opt_shardings = jax.tree.map(mesh_lib.on_host, opt_shardings)
    if offload == "optimizer_and_params":
        params_shardings = jax.tree.map(mesh_lib.on_host, params_shardings)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shardings = {"step": replicated, "skipped_steps": replicated, "params": params_shardings,
                 "opt_state": opt_shardings}
    tree = {"step": scalar, "skipped_steps": scalar, "params": params_abstract, "opt_state": opt_abstract}
    if frozen:
        rest = whole.subset(frozen)
        shardings["frozen"] = rest.shardings(mesh, mesh_lib.param_drop(zero_stage))
        tree["frozen"] = rest.abstract()
    if buffers is not None:
        tree["buffers"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), buffers)
        shardings["buffers"] = jax.tree.map(lambda _: replicated, buffers)
    if loss_guard:
        tree[loss_spike.KEY] = loss_spike.LossSpikeGuard.abstract()
        shardings[loss_spike.KEY] = jax.tree.map(lambda _: replicated, tree[loss_spike.KEY])
    grads = trainable.shardings(mesh, mesh_lib.grad_drop(zero_stage))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    return StateLayout(shardings, grads, abstract, tuple(frozen), offload, jnp.dtype(compute_dtype))


def all_params(state: dict[str, Any]) -> dict[str, Any]:
    """Every parameter group of a state, trainable and frozen, as one params dict."""
    return {**state["params"], **state.get("frozen", {})}


def initial_state(layout: StateLayout, tx: optax.GradientTransformation, params: Any, buffers: Any = None,
                  donate: bool = True) -> dict[str, Any]:
    """The step-0 state for `params` (every group, trainable and frozen) and the layout's `buffers`,
    built straight into the layout's shards; `params` may be an array tree (donated unless `donate` is
    false) or a function that returns one (traced, so a fresh initialisation is never materialised whole
    on one device)."""

    def init(values, buffers):
        values = params() if callable(params) else values
        trainable = {k: v for k, v in values.items() if k not in layout.frozen}
        zero = jnp.zeros((), jnp.int32)
        state = {"step": zero, "skipped_steps": zero, "params": trainable, "opt_state": tx.init(trainable)}
        if layout.frozen:
            state["frozen"] = {k: values[k] for k in layout.frozen}
        if buffers is not None:
            state["buffers"] = buffers
        if loss_spike.KEY in layout.state:
            state[loss_spike.KEY] = loss_spike.LossSpikeGuard.init()
        return mesh_lib.to_host(state, layout.state)  # an offloaded optimizer state starts in host memory

    if callable(params):
        return jax.jit(init, out_shardings=layout.state)(None, buffers)
    return jax.jit(init, out_shardings=layout.state, donate_argnums=0 if donate else ())(params, buffers)
