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
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

import jaxllm
from jaxllm.config import ModelConfig
from jaxllm.errors import UserError

# Model keys whose change makes a checkpoint unusable; the rest (dtype, remat) may change on resume.
SHAPE_KEYS = ("family", "layers", "d_model", "heads", "kv_heads", "d_ff", "vocab_size", "max_len",
              "tie_embeddings")


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
    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
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

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state onto the shardings carried by `abstract_state` and rewinds the iterator."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        return self.manager.restore(step, args=args)["state"]

    def resume_or_init(self, abstract_state: Any, data_iterator: Any, meta: dict[str, Any],
                       init: Callable[[], Any], check: Callable[[int], None] | None = None) -> tuple[Any, int]:
        """(state, step): the newest checkpoint restored onto `abstract_state`'s shardings (the iterator
        rewound with it), or `init()` at step 0 when there is none. Before restoring, the checkpoint must
        hold the same model shape and optimizer-state binding as `meta`, and pass the task's `check`. On
        any error the checkpointer is closed before the error propagates."""
        try:
            start = self.latest_step()
            if start is None:
                return init(), 0
            self.check_compatible(start, meta["model"])
            check_optimizer_state(self.read_meta(start).get("optimizer_state"), meta.get("optimizer_state"),
                                  self.directory / str(start))
            if check is not None:
                check(start)
            return self.restore(start, abstract_state, data_iterator), start
        except BaseException:
            self.close()  # the loop that would close it never starts
            raise

    def restore_part(self, step: int, abstract: Any) -> Any:
        """Only the part of the saved state that `abstract` names (a sub-tree of `ShapeDtypeStruct`s with
        shardings, e.g. `{"params": ...}`), each array read straight into its shards."""
        args = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def fault_point(name: str, step: int) -> None:
    """Test hook: `JAXLLM_FAULT=<name>:<step>` kills this process with SIGKILL at that point.

    The crash tests use it to die at an exact moment (mid-save, after a given step); it does
    nothing unless the variable names this point and step.
    """
    if os.environ.get("JAXLLM_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


