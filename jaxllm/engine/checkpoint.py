"""Orbax checkpoints of the training state, the data-iterator position and the run's model shape.

Each save goes to `WORKDIR/checkpoints/<step>/` with three items: `state` (params, optimizer state,
step counters; restored straight into the shards of whatever mesh the resuming run uses), `data` (the
Grain iterator state) and `meta` (JSON: the model config and jaxllm version). Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and the partial one is ignored on resume. Randomness needs no saved key: every
random choice is derived from `config.seed` and the step, which the state holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import jaxllm
from jaxllm import runtime
from jaxllm.config import ModelConfig
from jaxllm.data.jsonl import write_atomic
from jaxllm.data.shards import file_sha256
from jaxllm.engine import loss_spike
from jaxllm.errors import UserError
from jaxllm.models.stacking import BlockSlots, abstract_in_layout, convert_blocks

# Model keys whose change makes a checkpoint unusable; the rest (dtype, remat) may change on resume.
SHAPE_KEYS = ("family", "layers", "d_model", "heads", "kv_heads", "d_ff", "vocab_size", "max_len",
              "tie_embeddings")

# Top-level state entries that a checkpoint may lack or hold without the run's layout asking for them:
# switched on and off by config (the loss-spike guard's running mean). A missing one starts from zeros,
# as in a fresh run; an unused one is read and dropped.
OPTIONAL_STATE = (loss_spike.KEY,)


def model_meta(cfg: ModelConfig) -> dict[str, Any]:
    """The model settings stored with every checkpoint, with defaults resolved to their values."""
    return dataclasses.asdict(cfg) | {"kv_heads": cfg.num_kv_heads, "d_ff": cfg.ffn_dim, "tie_embeddings": cfg.tied}


def model_config(saved: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` a checkpoint's `meta["model"]` describes (the inverse of `model_meta`)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def run_meta(cfg: ModelConfig, optimizer_state: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint's `meta` item: the model, the jaxllm version, what the optimizer state is bound to
    (`TrainOptimizer.signature()`: None restores onto any mesh) and the task's own entries."""
    return {"model": model_meta(cfg), "jaxllm_version": jaxllm.__version__, "optimizer_state": optimizer_state,
            **extra}


def check_optimizer_state(saved: dict | None, wanted: dict | None, where: Any) -> None:
    """Refuses to resume per-device optimizer state on another mesh or with another optimizer.

    `saved`/`wanted`: `TrainOptimizer.signature()` of the checkpoint and of this run (None for AdamW,
    whose state restores onto any mesh)."""
    if saved == wanted:
        return
    describe = lambda s: (f"optimizer {s['optimizer']} on mesh {s['mesh']}" if s  # noqa: E731
                          else "optimizer adamw (no per-device state)")
    raise UserError(
        f"workdir checkpoint '{where}' holds the state of {describe(saved)}, but this run uses {describe(wanted)}; "
        "per-device error buffers only resume on the mesh that wrote them: use the same optimizer.name and "
        "mesh, or another --workdir")


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the checkpoints in `directory`, ascending (none when it does not exist)."""
    directory = Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def int_keys(tree: Any) -> Any:
    """A restored tree with its digit keys as ints again (Orbax returns the block indices as strings)."""
    if isinstance(tree, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: int_keys(v) for k, v in tree.items()}
    return tree


def workdir_step(workdir: str | os.PathLike, step: int | None = None, command: str = "python -m jaxllm.train"
                 ) -> tuple[Path, int]:
    """(checkpoints directory, step) of a run's workdir: `step`, or its newest checkpoint; a UserError
    names the workdir (and `command`, which trains one) when there is none."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: directory not found")
    directory = workdir / "checkpoints"
    steps = saved_steps(directory)
    if not steps:
        raise UserError(f"--workdir {workdir}: no checkpoint in {directory}; train first with "
                        f"{command} --workdir {workdir}")
    if step is not None and step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {directory}; found steps {steps}")
    return directory, steps[-1] if step is None else step


class Checkpointer:
    """Saves and restores a run's checkpoints in `directory`, keeping the newest `keep`.

    With `checksums`, every finished checkpoint gets a manifest beside it, `<step>.sha256` (the SHA-256
    of each of its files), written by the lead process once the save has completed; restoring checks it.
    A checkpoint that fails its manifest or cannot be read is damaged: `resume_or_init` sets it aside as
    `<step>.damaged` (nothing is deleted), says so in one line, and restores the newest intact one."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True, checksums: bool = False):
        self.directory = Path(directory).resolve()
        self.checksums = checksums
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def for_run(cls, workdir: Path, config: Any) -> Checkpointer:
        """The checkpointer of a training run: `WORKDIR/checkpoints` with the config's `checkpoint.*`."""
        c = config.checkpoint
        return cls(workdir / "checkpoints", c.keep, c.async_save, c.checksums)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
        self._seal()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        fault_point("kill_in_save", step)

    def read_meta(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def check_compatible(self, step: int, model_config: dict[str, Any]) -> None:
        """Raises UserError if the checkpoint at `step` holds a model of another shape."""
        saved = self.read_meta(step).get("model", {})
        diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {model_config.get(k)!r}"
                 for k in SHAPE_KEYS if saved.get(k) != model_config.get(k)]
        if diffs:
            raise UserError(
                f"workdir checkpoint '{self.directory / str(step)}' holds a different model ({'; '.join(diffs)}); "
                "use another --workdir or the checkpoint's model settings"
            )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any, slots: BlockSlots | None = None) -> Any:
        """Restores the state onto the shardings carried by `abstract_state` and rewinds the iterator
        (`OPTIONAL_STATE` entries the checkpoint lacks start from zeros). `slots`: the layout of the
        state's stacked decoder blocks; a checkpoint saved in another one is converted."""
        target, missing = self._restore_target(step, abstract_state)
        saved, layers = self._saved_slots(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_in_layout(target, saved, slots, layers)),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        state = _converted(self.manager.restore(step, args=args)["state"], saved, slots, layers, target)
        if target is abstract_state:
            return state
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding),
                             {k: abstract_state[k] for k in missing})
        return {k: state[k] if k in state else zeros[k] for k in abstract_state}

    def _restore_target(self, step: int, abstract_state: Any) -> tuple[Any, tuple[str, ...]]:
        """(what to read, optional entries the checkpoint lacks): `abstract_state` less those, plus any
        optional entry the checkpoint holds that the run does not use (read replicated, then dropped)."""
        if not isinstance(abstract_state, dict):
            return abstract_state, ()
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state").item_metadata
        missing = tuple(k for k in OPTIONAL_STATE if k in abstract_state and k not in saved)
        unused = [k for k in OPTIONAL_STATE if k in saved and k not in abstract_state]
        if not missing and not unused:
            return abstract_state, ()
        target = {k: v for k, v in abstract_state.items() if k not in missing}
        replicated = abstract_state["step"].sharding
        for k in unused:
            target[k] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved[k])
        return target, missing

    def resume_or_init(self, abstract_state: Any, data_iterator: Any, meta: dict[str, Any],
                       init: Callable[[], Any], check: Callable[[int], None] | None = None) -> tuple[Any, int]:
        """(state, step): the newest intact checkpoint restored onto `abstract_state`'s shardings (the
        iterator rewound with it), or `init()` at step 0 when there is none. Before restoring, the
        checkpoint must hold the same model shape and optimizer-state binding as `meta`, and pass the
        task's `check` (a UserError otherwise). Damaged checkpoints are set aside on the way; when every
        checkpoint is damaged the run stops with a UserError rather than start over. On any error the
        checkpointer is closed before the error propagates."""
        try:
            damaged = []
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    self.verify(step)
                    self.check_compatible(step, meta["model"])
                    check_optimizer_state(self.read_meta(step).get("optimizer_state"),
                                          meta.get("optimizer_state"), self.directory / str(step))
                    if check is not None:
                        check(step)
                    state = self.restore(step, abstract_state, data_iterator, meta_slots(meta))
                except UserError:
                    raise
                except Exception as err:  # noqa: BLE001 -- any failure to read a checkpoint is damage
                    damaged.append(self._set_aside(step, err))
                    continue
                if damaged:
                    _say(f"resuming from checkpoint {step}, the newest intact one")
                return state, step
            if damaged:
                raise UserError(f"no intact checkpoint in {self.directory}: {', '.join(damaged)} set aside as damaged; "
                                "restore them from a copy, or move them away to start the run afresh")
            return init(), 0
        except BaseException:
            self.close()  # the loop that would close it never starts
            raise

    def verify(self, step: int) -> None:
        """Raises DamagedCheckpoint when a file of checkpoint `step` differs from its manifest."""
        manifest = self.directory / f"{step}.sha256"
        if not manifest.is_file():
            return  # written without checksums, or killed before the save was sealed
        want = json.loads(manifest.read_text())
        got = _file_digests(self.directory / str(step))
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                problem = "is missing" if name not in got else "is not in the manifest" if name not in want else \
                    "fails its checksum"
                raise DamagedCheckpoint(f"{name} {problem}")

    def _seal(self) -> None:
        """Writes the manifest of every finished checkpoint that has none (lead process only), and drops
        the manifests of checkpoints that `keep` has removed."""
        if not self.checksums:
            return
        self.manager.wait_until_finished()
        if jax.process_index() != 0:
            return
        steps = set(self.manager.all_steps())
        for step in steps:
            manifest = self.directory / f"{step}.sha256"
            if not manifest.exists():
                write_atomic(manifest, [json.dumps(_file_digests(self.directory / str(step)), indent=1,
                                                   sort_keys=True)])
        for manifest in self.directory.glob("*.sha256"):
            if manifest.stem.isdigit() and int(manifest.stem) not in steps:
                manifest.unlink()

    def _set_aside(self, step: int, err: BaseException) -> str:
        """Renames a damaged checkpoint (and its manifest) out of Orbax's sight; returns its new name."""
        source = self.directory / str(step)
        target = self.directory / f"{step}.damaged"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.damaged.{n}"
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        if jax.process_index() == 0:
            source.rename(target)
            manifest = self.directory / f"{step}.sha256"
            if manifest.exists():
                manifest.rename(target.with_name(target.name + ".sha256"))
        runtime.barrier(f"set aside checkpoint {step}")
        self.manager.reload()
        _say(f"checkpoint {source} is damaged ({type(err).__name__}: {reason}); set aside as {target.name}")
        return str(step)

    def restore_part(self, step: int, abstract: Any, slots: BlockSlots | None = None) -> Any:
        """Only the part of the saved state that `abstract` names (a sub-tree of `ShapeDtypeStruct`s with
        shardings, e.g. `{"params": ...}`), each array read straight into its shards; decoder blocks
        saved in another layout than `slots` (None: one entry per block) are converted."""
        saved, layers = self._saved_slots(step)
        read = abstract_in_layout(abstract, saved, slots, layers)
        args = ocp.args.PyTreeRestore(item=read, restore_args=ocp.checkpoint_utils.construct_restore_args(read),
                                      partial_restore=True)
        return _converted(self.manager.restore(step, args=ocp.args.Composite(state=args))["state"], saved, slots,
                          layers, abstract)

    def _saved_slots(self, step: int) -> tuple[BlockSlots | None, int]:
        """(the layout checkpoint `step` holds its stacked decoder blocks in, or None; its layer count)."""
        meta = self.read_meta(step)
        return meta_slots(meta), meta.get("model", {}).get("layers", 0)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._seal()
        self.manager.close()


def meta_slots(meta: dict[str, Any]) -> BlockSlots | None:
    """The stacked layout a checkpoint meta names (`ModelDef.slots_meta`), or None."""
    layer = meta.get("block_slots")
    return None if layer is None else BlockSlots(tuple(layer))


def _converted(state: Any, saved: BlockSlots | None, slots: BlockSlots | None, layers: int, target: Any) -> Any:
    """`state`, read in layout `saved`, moved to layout `slots` onto `target`'s shardings."""
    if saved == slots:
        return state
    shardings = jax.tree.map(lambda a: a.sharding, target)
    return jax.jit(lambda s: convert_blocks(s, saved, slots, layers), out_shardings=shardings)(state)


class DamagedCheckpoint(Exception):
    """A checkpoint's files differ from its manifest."""


def _file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by path relative to it."""
    return {str(path.relative_to(directory)): file_sha256(path) for path in sorted(directory.rglob("*"))
            if path.is_file()}


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def fault_point(name: str, step: int) -> None:
    """Test hook: `JAXLLM_FAULT=<name>:<step>` kills this process with SIGKILL at that point.

    The crash tests use it to die at an exact moment (mid-save, after a given step); it does
    nothing unless the variable names this point and step.
    """
    if os.environ.get("JAXLLM_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


