"""The train step for the communication-efficient optimizers (1-bit Adam, 0/1 Adam, 1-bit LAMB).

The AdamW step (`jaxllm.engine.step`) lets GSPMD average the gradient over the data axis with an f32
all-reduce. Here each data-parallel slice keeps its own gradient, and the optimizer alone decides what
crosses the data axis: an exact average, packed 1-bit codes, or nothing. One step is two `shard_map`s
over a view of the mesh whose data axis is manual (`dp`; the model's own `data` axis has size 1
inside, so the model's sharding hints still apply to `fsdp`, `tensor` and `sequence`):

1. Gradients: manual over `dp` only. Each slice runs forward and backward on its rows of the batch
   with GSPMD handling `fsdp`/`tensor`/`sequence` inside the slice (parameter gathers and gradient
   reductions over `fsdp` stay within the slice), then takes the token mean of its own loss and
   clips its own gradient by `optimizer.grad_clip`.
2. Optimizer: manual over every axis. Each device updates its own shards of the parameters and
   optimizer state; compressed exchanges run over `dp` among the devices that hold the same shard.
   With `fsdp` (or `tensor`) > 1 a tensor is thus compressed shard by shard, each shard with its own
   RMS scale and error buffers; with the model whole on every device this is exactly DeepSpeed's
   per-tensor compression. Nothing in this step moves a full-precision gradient over the data axis
   except the exact phases (warm-up, 0/1 Adam's variance refreshes), which average it on purpose (in
   f32, or as bf16 words with `optimizer.exact_allreduce_dtype: bfloat16`).

Pipeline stages (`mesh.stage` > 1) keep an axis of their own in the view: the pipeline's shard_map,
manual over `stage`, runs inside each slice's gradient, and parameters and optimizer state are sharded
over `stage` as over `fsdp`, so the compressed exchanges still cross `dp` only.

Each optimizer phase compiles to its own program, chosen on the host from the step number (the
phase schedules are pure functions of the step), so a phase without communication has no collective
over the data axis in its program at all; `hlo_collectives` reads them from the compiled HLO.

State layout: parameters and the optimizer state that is identical on all devices (Adam moments,
counters) keep the usual shardings; state that differs between devices (error-feedback buffers, 0/1
Adam's local momentum and accumulated local progress, all under a field named `local`) is stored
per device: `[data, *param_shape]` sharded like the parameter for tensors shaped like a parameter,
else `[devices, *per_device_shape]` over all mesh axes. Checkpoints therefore hold every device's
error buffers and resume bitwise; they restore onto the same mesh shape only.

The per-device gradient is the token mean of that slice's batch (DeepSpeed's data parallelism); the
AdamW step divides the global token sum instead. The two agree whenever slices count the same number
of tokens. A step whose loss, gradient or update is not finite is skipped as in the AdamW step; a
non-finite value on one device reaches all devices through the exchange, so they skip together, except
in 0/1 Adam's local steps, where each device decides for itself (and `skipped_steps` then counts the
first device's skips).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import mesh as mesh_lib
from jaxllm.engine import loss_spike
from jaxllm.engine.loss_spike import LossSpikeGuard
from jaxllm.engine.state import ParamTree, StateLayout, is_axes
from jaxllm.engine.step import BUFFERS, counted_jit, gradient_sums, with_ltd_indices
from jaxllm.ltd import LTDSetup
from jaxllm.ops.cross_entropy import one_hot_targets
from jaxllm.optim import ONEBIT_OPTIMIZERS, PhasePlan, build_optimizer, phase_plan
from jaxllm.optim.onebit_allreduce import DEVICE_AXIS
from jaxllm.optim.zero_one_adam import ZeroOneAdamState

DATA = mesh_lib.MESH_AXES[0]  # the data-parallel axis of the run's mesh
STAGE = mesh_lib.STAGE_AXIS
MODEL_AXES = (STAGE, *mesh_lib.MESH_AXES[1:])  # stage, fsdp, tensor, sequence
INNER_AXES = (STAGE, DEVICE_AXIS, *mesh_lib.MESH_AXES)  # stage, dp, data (size 1), fsdp, tensor, sequence


def is_onebit(config: Any) -> bool:
    return config.optimizer.name in ONEBIT_OPTIMIZERS


def inner_mesh(mesh: Mesh) -> Mesh:
    """The same devices with the data axis renamed `dp` and a `data` axis of size 1 inserted (and a
    `stage` axis of size 1 for a mesh built without one). Pipeline stages stay an axis of their own, so
    the pipeline runs inside each data slice's gradient and the compressed exchanges never cross it."""
    sizes = dict(mesh.shape)
    shape = [sizes.get(STAGE, 1), sizes[DATA], 1, *(sizes[a] for a in mesh_lib.MESH_AXES[1:])]
    inner = Mesh(mesh.devices.reshape(shape), INNER_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(INNER_AXES))
    mesh_lib.share_pipeline(mesh, inner)
    return inner


def _to_outer(spec: PartitionSpec, outer_axes: tuple[str, ...] = mesh_lib.ALL_AXES) -> PartitionSpec:
    """An inner-mesh spec in the run's mesh names (`dp` is `data`; the inner `data` has size 1; the
    inner `stage` of a mesh built without one has size 1 too)."""

    def rename(entry):
        if entry is None:
            return None
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(DATA if n == DEVICE_AXIS else n for n in names if n != DATA or DEVICE_AXIS not in names)
        names = tuple(n for n in names if n in outer_axes)
        return names if len(names) > 1 else (names[0] if names else None)

    return PartitionSpec(*(rename(e) for e in spec))


def _spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    out = []
    for entry in spec:
        if entry is not None:
            out.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(out)


def local_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> tuple[int, ...]:
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return tuple(dim // math.prod(mesh.shape[a] for a in _spec_axes(PartitionSpec(e))) if e else dim
                 for dim, e in zip(shape, entries, strict=True))


def _is_per_device(path) -> bool:
    return any(isinstance(k, jax.tree_util.GetAttrKey) and k.name == "local" for k in path)


@dataclasses.dataclass(frozen=True)
class _LeafLayout:
    per_device: bool
    inner_spec: PartitionSpec  # global spec on the inner mesh (with the leading device axis if per device)
    shape: tuple[int, ...]  # global shape


class OneBitTraining:
    """Optimizer, optimizer-state layout and train step of a run with a 1-bit optimizer.

    `state_tx` initialises the global optimizer state, per-device leaves included (for
    `jaxllm.engine.state.initial_state`); `opt_state_layout()` gives its abstract tree and shardings
    (for `jaxllm.engine.state.state_layout`); `train_step()` builds the step for a task's loss.
    `params` are the trainable parameters (a `jaxllm.engine.state.ParamTree` or `ModelDef`).
    """

    def __init__(self, config: Any, mesh: Mesh, params: Any, schedule: optax.Schedule | None = None):
        if not is_onebit(config):
            raise ValueError(f"optimizer {config.optimizer.name!r} is not a 1-bit optimizer")
        self.config, self.mesh, self.params = config, mesh, ParamTree(params.logical_axes, params.shapes)
        self.inner = inner_mesh(mesh)
        self.data_size = mesh.shape[DATA]
        if self.data_size == 1:
            warnings.warn(
                f"optimizer.name={config.optimizer.name} with a data axis of size 1 (mesh {dict(mesh.shape)}): "
                "there is nothing to compress; the run trains with the same updates as on one device "
                "(DeepSpeed's single-worker behaviour). Use mesh.data > 1 to compress.", UserWarning, stacklevel=2)
        zero = config.mesh.zero_stage
        self.opt_specs = jax.tree.map(
            lambda axes, shape: mesh_lib.logical_to_spec(axes, shape, mesh, mesh_lib.opt_drop(zero)),
            self.params.logical_axes, self.params.shapes, is_leaf=is_axes)
        self.norm_axes = jax.tree.map(_spec_axes, self.opt_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        self.tx, self.schedule = build_optimizer(config, schedule, norm_axes=self.norm_axes)
        self.plan: PhasePlan = phase_plan(config)
        self._param_abstract = self.params.abstract()
        self._leaves = self._analyse_state()
        self.state_tx = optax.GradientTransformation(self._global_init, _no_global_update)

    def signature(self) -> dict[str, Any]:
        """What a checkpoint's optimizer state is bound to: the optimizer and the mesh shape (`stage` only
        when there are stages, so that checkpoints written before the axis existed still match)."""
        sizes = dict(self.mesh.shape)
        stages = {STAGE: int(sizes[STAGE])} if sizes.get(STAGE, 1) > 1 else {}
        return {"optimizer": self.config.optimizer.name,
                "mesh": stages | {a: int(sizes[a]) for a in mesh_lib.MESH_AXES}}

    # -- layout ---------------------------------------------------------------------------------

    def _in_inner(self, fn: Callable) -> Callable:
        def wrapped(*args):
            with jax.sharding.use_abstract_mesh(self.inner.abstract_mesh):
                return fn(*args)
        return wrapped

    def _paramlocal_shapes(self) -> dict[tuple, tuple[tuple[int, ...], PartitionSpec]]:
        flat_specs = jax.tree_util.tree_flatten_with_path(self.opt_specs,
                                                          is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
        shapes = jax.tree.leaves(self._param_abstract)
        return {tuple(path): (local_shape(s.shape, spec, self.mesh), spec, s.shape)
                for (path, spec), s in zip(flat_specs, shapes, strict=True)}

    def _analyse_state(self) -> Any:
        """Per optimizer-state leaf: per device or not, its spec and global shape."""
        mapped = jax.shard_map(self.tx.init, mesh=self.inner, in_specs=(self.opt_specs,), out_specs=PartitionSpec(),
                               check_vma=False)
        local = jax.eval_shape(self._in_inner(mapped), self._param_abstract)
        params = self._paramlocal_shapes()

        def classify(path, leaf):
            path = tuple(path)
            mirror = None
            for start in range(len(path)):
                found = params.get(path[start:])
                if found is not None and found[0] == leaf.shape:
                    mirror = found
                    break
            per_device = _is_per_device(path)
            if mirror is not None:
                _, spec, shape = mirror
                if per_device:
                    return _LeafLayout(True, PartitionSpec(DEVICE_AXIS, *spec), (self.data_size, *shape))
                return _LeafLayout(False, spec, shape)
            if per_device:
                return _LeafLayout(True, PartitionSpec(INNER_AXES), (self.mesh.devices.size, *leaf.shape))
            return _LeafLayout(False, PartitionSpec(), leaf.shape)

        self._local_abstract = local
        return jax.tree_util.tree_map_with_path(classify, local)

    def opt_state_layout(self) -> tuple[Any, Any]:
        """(abstract tree, shardings) of the global optimizer state, per-device leaves included."""
        is_leaf = lambda x: isinstance(x, _LeafLayout)  # noqa: E731
        outer = self.mesh.axis_names
        shardings = jax.tree.map(lambda lf: NamedSharding(self.mesh, _to_outer(lf.inner_spec, outer)), self._leaves,
                                 is_leaf=is_leaf)
        local_leaves = jax.tree.leaves(self._local_abstract)
        abstract = jax.tree.unflatten(
            jax.tree.structure(self._local_abstract),
            [jax.ShapeDtypeStruct(lf.shape, loc.dtype)
             for lf, loc in zip(jax.tree.leaves(self._leaves, is_leaf=is_leaf), local_leaves, strict=True)])
        return abstract, shardings

    def _opt_in_specs(self) -> Any:
        return jax.tree.map(lambda lf: lf.inner_spec, self._leaves, is_leaf=lambda x: isinstance(x, _LeafLayout))

    def _squeeze(self, opt_state: Any) -> Any:
        return jax.tree.map(lambda lf, x: x[0] if lf.per_device else x, self._leaves, opt_state,
                            is_leaf=lambda x: isinstance(x, _LeafLayout))

    def _expand(self, opt_state: Any) -> Any:
        return jax.tree.map(lambda lf, x: x[None] if lf.per_device else x, self._leaves, opt_state,
                            is_leaf=lambda x: isinstance(x, _LeafLayout))

    def _global_init(self, params: Any) -> Any:
        """The optimizer state of every device, initialised on its own shards."""
        mapped = jax.shard_map(lambda p: self._expand(self.tx.init(p)), mesh=self.inner, in_specs=(self.opt_specs,),
                               out_specs=self._opt_in_specs(), check_vma=False)
        return self._in_inner(mapped)(params)

    # -- step -----------------------------------------------------------------------------------

    def train_step(self, loss_fn: Callable, layout: StateLayout, grad_accum: int = 1, ltd: LTDSetup | None = None,
                   summarize: Callable[[int], bool] | None = None, spike_guard: LossSpikeGuard | None = None
                   ) -> OneBitStep:
        """The step callable for a task's `loss_fn` (`jaxllm.engine.step.LossFn`); `summarize(step)` says
        after which (1-based) steps to reduce the per-device metrics to the usual scalars (`loss`,
        `grad_norm`, `lr`, `tokens`, `skipped` and the loss's aux metrics); `spike_guard` skips a step
        whose loss over all slices spikes (`jaxllm.engine.loss_spike`)."""
        if BUFFERS in layout.state:  # each data slice would update its own copy
            raise ValueError("the 1-bit optimizers' train step does not carry buffers (state updated by the loss)")
        return OneBitStep(self, loss_fn, layout, grad_accum, ltd, summarize or (lambda step: True), spike_guard)

    def _step_fn(self, phase: int, loss_fn: Callable, grad_accum: int, ltd: LTDSetup | None,
                 kept: int | None, guard: LossSpikeGuard | None = None) -> Callable:
        clip = self.config.optimizer.grad_clip
        model_axes = tuple(a for a in MODEL_AXES if dict(self.mesh.shape).get(a, 1) > 1)
        opt_specs = self.opt_specs
        is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
        replicated_params = jax.tree.map(lambda _: PartitionSpec(), opt_specs, is_leaf=is_spec)
        per_slice = jax.tree.map(lambda _: PartitionSpec(DEVICE_AXIS), opt_specs, is_leaf=is_spec)
        per_slice_full = jax.tree.map(lambda s: PartitionSpec(DEVICE_AXIS, *s), opt_specs, is_leaf=is_spec)

        def gradients(params, frozen, offset, batch):
            if offset is not None:  # 0/1 Adam: this slice's parameters include its local progress
                params = jax.tree.map(lambda p, a: p + a[0], params, offset)
            with one_hot_targets():  # vocab-sharded logits cannot be gathered in a data-manual shard_map
                grad_sum, loss_sum, count, aux, _ = gradient_sums(loss_fn, params, frozen, batch, grad_accum, ltd)
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grad_sum)
            norm = optax.tree.norm(grads)
            if clip > 0:  # as optax.clip_by_global_norm, on this slice's gradient
                grads = jax.tree.map(lambda g: jnp.where(norm < clip, g, g / norm * clip), grads)
            grads = jax.tree.map(lambda g, s: jax.lax.with_sharding_constraint(g, s), grads, opt_specs)
            return (jax.tree.map(lambda g: g[None], grads), loss_sum[None], count[None], norm[None],
                    jax.tree.map(lambda a: a[None], aux))

        def optimizer(params, grads, opt_state, skipped_steps, loss_sum, spike):
            grads = jax.tree.map(lambda g: g[0], grads)
            opt_state = self._squeeze(opt_state)
            updates, new_opt = self.tx.update(grads, opt_state, params, phase=phase)
            new_params = optax.apply_updates(params, updates)
            total = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves((grads, updates, new_opt))
                        if jnp.issubdtype(x.dtype, jnp.floating))
            finite = jnp.isfinite(total) & jnp.isfinite(loss_sum[0]) & ~spike
            if model_axes:  # the shards of one slice decide together
                finite = jax.lax.pmin(finite.astype(jnp.int32), model_axes).astype(bool)
            # One conditional instead of a select per leaf: XLA would copy the finiteness reduction into
            # every select's fusion (tens of thousands of instructions, minutes of compilation).
            new_params, new_opt = jax.lax.cond(finite, lambda: (new_params, new_opt), lambda: (params, opt_state))
            skipped = (~finite).astype(jnp.int32)
            return new_params, self._expand(new_opt), skipped_steps + skipped, skipped[None]

        opt_in = self._opt_in_specs()

        def step(state, batch):
            offset = _local_update(state["opt_state"])
            frozen = state.get("frozen")
            slices = PartitionSpec(DEVICE_AXIS)
            grad_part = jax.shard_map(
                gradients, mesh=self.inner, axis_names=frozenset({DEVICE_AXIS}), check_vma=False,
                in_specs=(replicated_params, jax.tree.map(lambda _: PartitionSpec(), frozen),
                          None if offset is None else per_slice, slices),
                out_specs=(per_slice, slices, slices, slices, slices))
            grads, loss_sum, count, norm, aux = grad_part(state["params"], frozen, offset, batch)
            # The guard judges the loss of all slices together, so every slice skips a spike alike.
            loss = jnp.sum(loss_sum) / jnp.maximum(jnp.sum(count), 1.0) if guard else None
            spike = guard.is_spike(state[loss_spike.KEY], loss) if guard else jnp.bool_(False)
            opt_part = jax.shard_map(
                optimizer, mesh=self.inner, check_vma=False,
                in_specs=(opt_specs, per_slice_full, opt_in, PartitionSpec(), PartitionSpec(DEVICE_AXIS),
                          PartitionSpec()),
                out_specs=(opt_specs, opt_in, PartitionSpec(), PartitionSpec(DEVICE_AXIS)))
            params, opt_state, skipped_steps, skipped = opt_part(state["params"], grads, state["opt_state"],
                                                                 state["skipped_steps"], loss_sum, spike)
            new_state = dict(state, step=state["step"] + 1, skipped_steps=skipped_steps, params=params,
                             opt_state=opt_state)
            if guard:
                new_state[loss_spike.KEY] = guard.update(state[loss_spike.KEY], loss, jnp.max(skipped) == 0, spike)
            return new_state, {"loss_sum": loss_sum, "tokens": count, "grad_norm": norm, "skipped": skipped,
                               "aux": aux}

        inner = self._in_inner(step)

        def with_ltd(state, batch):
            # Drawn on the run's mesh, where the step counter lives, before the per-slice view.
            return inner(state, with_ltd_indices(batch, ltd, state["step"], kept))

        return inner if kept is None else with_ltd


def _no_global_update(updates, state, params=None):
    raise RuntimeError("OneBitTraining.state_tx only initialises state; "
                       "its updates run in OneBitTraining.train_step")


def _local_update(opt_state: Any) -> Any:
    """0/1 Adam's per-slice local progress `[data, *param_shape]`, or None for other optimizers."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ZeroOneAdamState))
             if isinstance(s, ZeroOneAdamState)]
    return found[0].local.momentum_accumulator if found else None


class OneBitStep:
    """`step(state, batch) -> (state, metrics)`, choosing the compiled program of the step's phase.

    The step number is read from the state once and then counted on the host (a new state object
    that is not the one this step returned last is read again). Metrics are per device unless
    `summarize(step)` is true, then the usual scalars.
    """

    def __init__(self, training: OneBitTraining, loss_fn: Callable, layout: StateLayout, grad_accum: int,
                 ltd: LTDSetup | None, summarize: Callable[[int], bool], spike_guard: LossSpikeGuard | None = None):
        self.training = training
        self.spike_guard = spike_guard
        self.loss_fn = loss_fn
        self.grad_accum = grad_accum
        self.ltd = ltd
        self.summarize = summarize
        self._compiled: dict[tuple[int, int | None], Callable] = {}
        self._host_step: int | None = None
        self._last: Any = None
        self._summary = jax.jit(_summarize)
        self._state_shardings = layout.state

    def program(self, phase: int, kept: int | None = None) -> Callable:
        """The jitted step of one phase and random-LTD kept length (compiled on first use)."""
        if (phase, kept) not in self._compiled:
            fn = self.training._step_fn(phase, self.loss_fn, self.grad_accum, self.ltd, kept, self.spike_guard)
            jitted = counted_jit(fn, in_shardings=(self._state_shardings, None),
                                 out_shardings=(self._state_shardings, None), donate_argnums=0)
            if dict(self.training.mesh.shape).get(STAGE, 1) > 1:
                jitted = _UnderMesh(jitted, self.training.inner)
            self._compiled[phase, kept] = jitted
        return self._compiled[phase, kept]

    def compiled_programs(self) -> int:
        """Programs compiled so far (one per phase and batch shape)."""
        return sum(f.compiled_programs() for f in self._compiled.values())

    def __call__(self, state: Any, batch: dict[str, jax.Array], kept: int | None = None) -> tuple[Any, dict[str, Any]]:
        if self._host_step is None or state is not self._last:
            self._host_step = int(jax.device_get(state["step"]))
        step = self._host_step + 1
        phase = self.training.plan.phase(step)  # an index into `training.plan.names`
        new_state, metrics = self.program(phase, kept)(state, batch)
        self._host_step, self._last = step, new_state
        if self.summarize(step):
            summary = self._summary(metrics)
            metrics = {**summary, "lr": jnp.float32(self.training.schedule(step - 1)), "phase": phase}
        return new_state, metrics


class _UnderMesh:
    """A jitted step traced and lowered with `mesh` (the 1-bit view) as the context mesh.

    The pipeline's `jax.lax.axis_index(stage)`, in a shard_map nested inside the data-manual one, is
    lowered (jax 0.10) through one more shard_map over the context mesh; under the run's own mesh, whose
    axis names differ from the view's, that lowering never finds every axis manual and recurses until
    Python's recursion limit. With the view as the context mesh it lowers once."""

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)

    def compiled_programs(self) -> int:
        return self.jitted.compiled_programs()


def _summarize(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    tokens = jnp.sum(metrics["tokens"])
    denom = jnp.maximum(tokens, 1.0)
    return {"loss": jnp.sum(metrics["loss_sum"]) / denom, "tokens": tokens,
            "grad_norm": jnp.mean(metrics["grad_norm"]), "skipped": jnp.max(metrics["skipped"]),
            **{k: jnp.sum(v) / denom for k, v in metrics["aux"].items()}}


# -- communication volume from compiled HLO ----------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\(.*\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+("
                          + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    kind: str
    dtypes: tuple[str, ...]
    elements: int  # elements of the result (summed over a tuple result)
    bytes: int  # bytes of the result
    groups: tuple[tuple[int, ...], ...]  # device groups (positions in the mesh's device order); () = all

    def group_size(self, devices: int) -> int:
        return len(self.groups[0]) if self.groups else devices

    def traffic(self, devices: int) -> float:
        """Bytes each device sends, for the usual algorithms: ring all-reduce 2 S (W-1)/W, all-gather
        and all-to-all S (W-1)/W of the result size S, reduce-scatter (W-1) S, permute S."""
        w = self.group_size(devices)
        if w <= 1:
            return 0.0
        share = (w - 1) / w
        return {"all-reduce": 2 * self.bytes * share, "all-gather": self.bytes * share,
                "all-to-all": self.bytes * share, "reduce-scatter": self.bytes * (w - 1),
                "collective-permute": float(self.bytes)}[self.kind]


def _parse_groups(line: str) -> tuple[tuple[int, ...], ...]:
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in iota.group(2).split(","))).reshape(
            [int(x) for x in iota.group(2).split(",")])
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return tuple(tuple(int(i) for i in row) for row in ids.reshape(shape[0], -1))
    explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)?\}", line)
    if explicit and explicit.group(1):
        return tuple(tuple(int(i) for i in g.split(",") if i) for g in re.findall(r"\{([\d,]*)\}", explicit.group(1)))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", line)
    if pairs:
        return tuple(tuple(int(i) for i in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", line))
    return ()


def hlo_collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction in a compiled module's text (`compiled.as_text()`)."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        kind, started = match.group(2), match.group(3)
        arrays = _ARRAY.findall(match.group(1))
        if started and kind in ("all-gather", "collective-permute") and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2:]  # async start: ((operands), (results)); count the results
        dtypes = tuple(dict.fromkeys(a[0] for a in arrays))
        elements = sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in arrays)
        size = sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(t, 4) for t, dims in arrays)
        found.append(Collective(kind, dtypes, elements, size, _parse_groups(line)))
    return found
