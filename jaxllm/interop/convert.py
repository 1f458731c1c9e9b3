"""Convert between Hugging Face directories and jaxllm training checkpoints.

    python -m jaxllm.interop.convert to-hf RUN OUT [--step N] [--dtype bfloat16] [--max-shard-size 5GB]
    python -m jaxllm.interop.convert from-hf HF_DIR WORKDIR [--config C] [section.key=value ...]

`to-hf` reads the parameters of a jaxllm checkpoint (RUN is a workdir, its `checkpoints/` folder or one
`checkpoints/<step>/` folder; the newest step by default) and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Only the parameters are restored; the
optimizer state is skipped.

`from-hf` writes `WORKDIR/checkpoints/0/` (parameters from HF_DIR, a fresh optimizer state and data
position for the given training config) and `WORKDIR/config.yaml`, the full config with the model
section filled from the checkpoint's config.json, so that

    python -m jaxllm.train --config=WORKDIR/config.yaml --workdir=WORKDIR

continues from it. (`model.init_from=HF_DIR` does the same without an intermediate checkpoint.)

Either direction writes into a temporary directory and moves it into place when complete: a failed
conversion leaves nothing behind. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from jaxllm.config import ModelConfig
from jaxllm.engine.checkpoint import int_keys, model_config
from jaxllm.errors import UserError, exit_status


def _step_dir(run: Path, step: int | None) -> Path:
    """The `checkpoints/<step>` folder named by `run` (a workdir, checkpoints folder or step folder)."""
    if (run / "state").is_dir() and (run / "meta").is_dir():
        if step is not None and run.name != str(step):
            raise UserError(f"--step {step} given, but '{run}' is the checkpoint of step {run.name}")
        return run
    folder = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    if not folder.is_dir():
        raise UserError(f"jaxllm checkpoint '{run}' does not exist")
    steps = sorted(int(p.name) for p in folder.iterdir()
                   if p.name.isdigit() and (p / "state").is_dir() and (p / "meta").is_dir())
    if not steps:
        raise UserError(f"'{folder}' holds no complete jaxllm checkpoint (expected <step>/state and <step>/meta)")
    if step is None:
        return folder / str(steps[-1])
    if step not in steps:
        raise UserError(f"'{folder}' has no checkpoint for step {step}; found steps {steps}")
    return folder / str(step)


def _model_config(meta: dict[str, Any], where: Path) -> ModelConfig:
    model = meta.get("model")
    if not isinstance(model, dict):
        raise UserError(f"'{where / 'meta'}' holds no model config")
    cfg = model_config(model)
    cfg.validate()
    return cfg


def read_checkpoint_params(step_dir: Path) -> tuple[dict, ModelConfig]:
    """(params as host numpy arrays, model config) from a jaxllm `checkpoints/<step>` folder."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    cfg = _model_config(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir.absolute() / "meta"), step_dir)
    step_dir = step_dir.absolute()  # Orbax reads absolute paths only; users type relative ones
    checkpointer = ocp.PyTreeCheckpointer()
    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
    if "params" not in tree:
        raise UserError(f"'{step_dir / 'state'}' holds no 'params'")
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    args = ocp.args.PyTreeRestore(item={"params": item}, restore_args={"params": restore}, partial_restore=True)
    return int_keys(checkpointer.restore(step_dir / "state", args=args)["params"]), cfg


def to_hf(run: Path, out: Path, step: int | None = None, dtype: str = "float32",
          max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    from jaxllm.interop import hf

    step_dir = _step_dir(run, step)
    source, target = Path(run).resolve(), Path(out).resolve()
    if target == source or source in target.parents or target in step_dir.resolve().parents:  # overwriting loses it
        raise UserError(f"OUT '{out}' is, contains or lies inside the run '{run}' it reads; choose a directory "
                        "outside it")
    params, cfg = read_checkpoint_params(step_dir)
    return hf.save(params, cfg, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)


def from_hf(hf_dir: Path, workdir: Path, config_path: str | None, overrides: list[str]) -> Path:
    """Writes WORKDIR/checkpoints/0 and WORKDIR/config.yaml; returns the checkpoint folder."""
    import jax

    from jaxllm import config as config_lib
    from jaxllm import mesh as mesh_lib
    from jaxllm import runtime
    from jaxllm.data.pipeline import SyntheticRows, make_train_iterator
    from jaxllm.engine.checkpoint import Checkpointer, run_meta
    from jaxllm.interop import hf
    from jaxllm.pretraining import LanguageModelTraining

    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise UserError(f"workdir '{workdir}' is not empty; from-hf writes a new workdir")
    if not workdir.parent.is_dir():
        raise UserError(f"workdir '{workdir}': parent directory '{workdir.parent}' does not exist")
    config = config_lib.load(config_path, [*overrides, f"model.init_from={hf_dir}"])
    config = hf.resolve_init_from(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    runtime.check_batch(config, mesh)
    tmp = workdir.with_name(f".{workdir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with jax.set_mesh(mesh):
            task = LanguageModelTraining.build(config, mesh)
            state = task.init_state(hf.load_params(config.model.init_from, config.model, task.layout.state["params"]))
        # The saved data item is the iterator's position, which is 0 before the first step for any
        # source; an iterator of the same pipeline over placeholder rows records it without
        # tokenizing the corpus here (the training run prepares its data as usual).
        batch, seq_len = config.train.batch_size, config.data.seq_len
        slot, slots = runtime.data_slot(mesh, (batch, seq_len))
        iterator = make_train_iterator(SyntheticRows(config.model.vocab_size, seq_len, batch), batch, config.seed,
                                       slot, slots)
        ckpt = Checkpointer(tmp / "checkpoints", config.checkpoint.keep, async_save=False)
        ckpt.save(0, state, iterator, run_meta(config.model, task.optimizer.signature()))
        ckpt.close()
        saved = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=None))
        (tmp / "config.yaml").write_text(yaml.safe_dump(saved.to_dict(), sort_keys=False))
        if workdir.exists():
            workdir.rmdir()
        tmp.rename(workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return workdir / "checkpoints" / "0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.interop.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    out = sub.add_parser("to-hf", help="jaxllm checkpoint -> Hugging Face directory")
    out.add_argument("run", type=Path, help="a workdir, its checkpoints/ folder, or one checkpoints/<step>/ folder")
    out.add_argument("out", type=Path, help="the Hugging Face directory to create")
    out.add_argument("--step", type=int, help="the step to convert (default: the newest)")
    out.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    out.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB or 500MiB")
    out.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    into = sub.add_parser("from-hf", help="Hugging Face directory -> jaxllm workdir with a step-0 checkpoint")
    into.add_argument("hf_dir", type=Path)
    into.add_argument("workdir", type=Path, help="a new (or empty) workdir")
    into.add_argument("--config", help="the training config the workdir will be trained with")
    into.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        if args.command == "to-hf":
            done = to_hf(args.run, args.out, args.step, args.dtype, args.max_shard_size, args.overwrite)
        else:
            done = from_hf(args.hf_dir, args.workdir, args.config, args.overrides)
        print(f"wrote {done}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
