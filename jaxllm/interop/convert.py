"""Convert between Hugging Face directories and jaxllm training checkpoints.

    python -m jaxllm.interop.convert to-hf RUN OUT [--step N] [--dtype bfloat16] [--max-shard-size 5GB]
    python -m jaxllm.interop.convert from-hf HF_DIR WORKDIR [--config C] [section.key=value ...]

`to-hf` reads the parameters of a jaxllm checkpoint (RUN is a workdir, its `checkpoints/` folder or one
`checkpoints/<step>/` folder; the newest step by default) and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Only the parameters are restored; the
optimizer state is skipped. The run's tokenizer (`WORKDIR/data/tokenizer.model` or `.json`) is
written beside the weights with a `tokenizer_config.json`, and its BOS/EOS/PAD ids go into
config.json.

`from-hf` writes `WORKDIR/checkpoints/0/` (parameters from HF_DIR, a fresh optimizer state and data
position for the given training config), HF_DIR's tokenizer files in `WORKDIR/data/`, and
`WORKDIR/config.yaml`, the full config with the model section filled from the checkpoint's
config.json, so that

    python -m jaxllm.train --config=WORKDIR/config.yaml --workdir=WORKDIR

continues from it. (`model.init_from=HF_DIR` does the same without an intermediate checkpoint.) The
data section is the one given (`--config` or `data.*` overrides); given none, it is `data.source:
tokens` with `data.path: null`, which the training run refuses until `data.path=DIR` names the
token shards: a model continued on random tokens is never what was meant.

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
from jaxllm.engine.checkpoint import int_keys, meta_slots, model_config
from jaxllm.errors import UserError, exit_status
from jaxllm.models.stacking import convert_blocks


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

    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir.absolute() / "meta")
    cfg = _model_config(meta, step_dir)
    step_dir = step_dir.absolute()  # Orbax reads absolute paths only; users type relative ones
    checkpointer = ocp.PyTreeCheckpointer()
    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
    if "params" not in tree:
        raise UserError(f"'{step_dir / 'state'}' holds no 'params'")
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    args = ocp.args.PyTreeRestore(item={"params": item}, restore_args={"params": restore}, partial_restore=True)
    params = int_keys(checkpointer.restore(step_dir / "state", args=args)["params"])
    return convert_blocks(params, meta_slots(meta), None, cfg.layers), cfg  # one entry per block


def to_hf(run: Path, out: Path, step: int | None = None, dtype: str = "float32",
          max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    from jaxllm.interop import hf

    step_dir = _step_dir(run, step)
    source, target = Path(run).resolve(), Path(out).resolve()
    if target == source or source in target.parents or target in step_dir.resolve().parents:  # overwriting loses it
        raise UserError(f"OUT '{out}' is, contains or lies inside the run '{run}' it reads; choose a directory "
                        "outside it")
    params, cfg = read_checkpoint_params(step_dir)
    return hf.save(params, cfg, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                   tokenizer=run_tokenizer(step_dir))


def run_tokenizer(step_dir: Path) -> Path | None:
    """The tokenizer file of the workdir that holds `checkpoints/<step>` (`WORKDIR/data/`), if it has one."""
    from jaxllm.data.tokenizer import workdir_tokenizer_file

    checkpoints = step_dir.absolute().parent
    return workdir_tokenizer_file(checkpoints.parent) if checkpoints.name == "checkpoints" else None


def from_hf(hf_dir: Path, workdir: Path, config_path: str | None, overrides: list[str]) -> Path:
    """Writes WORKDIR/checkpoints/0 and WORKDIR/config.yaml; returns the checkpoint folder."""
    import jax

    from jaxllm import config as config_lib
    from jaxllm import mesh as mesh_lib
    from jaxllm import runtime
    from jaxllm.data.pipeline import SyntheticRows, make_train_iterator
    from jaxllm.engine.checkpoint import Checkpointer
    from jaxllm.interop import hf
    from jaxllm.pretraining import LanguageModelTraining

    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise UserError(f"workdir '{workdir}' is not empty; from-hf writes a new workdir")
    if not workdir.parent.is_dir():
        raise UserError(f"workdir '{workdir}': parent directory '{workdir.parent}' does not exist")
    values = config_lib.read_values(config_path, [*overrides, f"model.init_from={hf_dir}"])
    has_data = "source" in (values.get("data") or {})
    config = hf.resolve_init_from(config_lib.from_dict(values))
    mesh = mesh_lib.make_mesh(config.mesh)
    runtime.check_batch(config, mesh)
    tmp = workdir.with_name(f".{workdir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with jax.set_mesh(mesh):
            task = LanguageModelTraining.build(config, mesh)
            state = task.init_state(hf.load_params(config.model.init_from, config.model, task.load_shardings()))
        # The saved data item is the iterator's position, which is 0 before the first step for any
        # source; an iterator of the same pipeline over placeholder rows records it without
        # tokenizing the corpus here (the training run prepares its data as usual).
        batch, seq_len = config.train.batch_size, config.data.seq_len
        slot, slots = runtime.data_slot(mesh, (batch, seq_len))
        iterator = make_train_iterator(SyntheticRows(config.model.vocab_size, seq_len, batch), batch, config.seed,
                                       slot, slots)
        ckpt = Checkpointer(tmp / "checkpoints", config.checkpoint.keep, async_save=False)
        ckpt.save(0, state, iterator, task.meta())
        ckpt.close()
        tokenizer = _copy_tokenizer(hf_dir, tmp / "data", config.data.source)
        saved = dataclasses.replace(config, model=dataclasses.replace(config.model, init_from=None)).to_dict()
        if has_data and saved["data"]["source"] == "text" and saved["data"]["tokenizer"] is None and tokenizer:
            # The corpus is tokenized with the model's own tokenizer, not a new one.
            saved["data"]["tokenizer"] = str(workdir / "data" / tokenizer)
        header = ""
        if not has_data:  # a training run must be told its data, never train on random tokens by default
            saved["data"]["source"] = "tokens"
            header = NO_DATA_HEADER.format(workdir=workdir) if saved["data"]["path"] is None else ""
        (tmp / "config.yaml").write_text(header + yaml.safe_dump(saved, sort_keys=False))
        if workdir.exists():
            workdir.rmdir()
        tmp.rename(workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return workdir / "checkpoints" / "0"


NO_DATA_HEADER = ("# from-hf was given no data: set data.path to token shards made with this model's tokenizer\n"
                  "# (python -m jaxllm.data.prepare --tokenizer ITS.model ...), e.g.\n"
                  "#   python -m jaxllm.train --config={workdir}/config.yaml --workdir={workdir} data.path=DIR\n")
# What a Hugging Face directory may hold about its tokenizer; the configs keep its special tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(hf_dir: Path, data: Path, source: str) -> str | None:
    """Copies HF_DIR's tokenizer files into WORKDIR/data/, where generation and the checks of later runs
    look; returns the SentencePiece file's name when there is one.

    Skipped for `data.source=text` when HF_DIR has only a `tokenizer.json`: that run trains its own
    SentencePiece model into the same folder, and the two must not be confused."""
    present = [name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    sentencepiece = "tokenizer.model" in present
    if not (sentencepiece or "tokenizer.json" in present) or (source == "text" and not sentencepiece):
        return None
    data.mkdir()
    for name in present:
        shutil.copyfile(hf_dir / name, data / name)
    return "tokenizer.model" if sentencepiece else None


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
            data = yaml.safe_load((args.workdir / "config.yaml").read_text())["data"]
            if data["source"] == "tokens" and data["path"] is None:
                print(f"{args.workdir / 'config.yaml'} names no training data: give data.path=DIR (token shards) "
                      "to python -m jaxllm.train, or pass --config with a data section to from-hf")
        print(f"wrote {done}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
