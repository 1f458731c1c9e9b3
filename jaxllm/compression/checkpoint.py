"""Compressed checkpoints: integer codes and scales on disk, loaded back as a `Decoder`.

Layout (the same as a training workdir's, so the same tools find it):

    WORKDIR/checkpoints/<step>/state   {"params": tree}  (Orbax)
    WORKDIR/checkpoints/<step>/meta    {"model": {...}, "compression": {...}, "jaxllm_version": ...}
    WORKDIR/data/tokenizer.model       copied from the teacher's workdir when it has one

In `params`, an uncompressed weight is its f32 array; a quantized one is a dict `{"codes", "scale"}`
(+ `"zero"` when asymmetric) and a weight with only its input activations quantized is
`{"weight"}`; static activation ranges add `"act_low"`, `"act_high"`. `meta["compression"]["specs"]`
holds each module's `QuantSpec`, which says how to read its dict. `meta["model"]` is the same model
section a training checkpoint carries, so `jaxllm.generate` and `jaxllm.train` read the architecture
from it as usual; `load_workdir` has `jaxllm.generate.load_workdir`'s signature and result.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

import jaxllm
from jaxllm.compression.model import get_path, module_path, set_path
from jaxllm.compression.qtensor import FakeQuantWeight, QuantizedWeight, QuantSpec
from jaxllm.compression.quantizers import ActRange
from jaxllm.config import ModelConfig
from jaxllm.engine.checkpoint import int_keys, model_config, model_meta, saved_steps
from jaxllm.errors import UserError
from jaxllm.models.decoder import Decoder
from jaxllm.models.definition import ModelDef

FORMAT = 1
TOKENIZER = "tokenizer.model"


def _serialize(tree: dict, specs: dict[str, QuantSpec]) -> dict:
    out = tree
    for name in specs:
        path = module_path(name)
        w = get_path(tree, path)
        if isinstance(w, QuantizedWeight):
            entry = {"codes": w.codes, "scale": w.scale} | ({} if w.zero is None else {"zero": w.zero})
        elif isinstance(w, FakeQuantWeight):
            entry = {"weight": w.w}
        else:
            raise ValueError(f"module '{name}' is planned but not compressed in the tree")
        if w.act_range is not None:
            entry |= {"act_low": w.act_range.low, "act_high": w.act_range.high}
        out = set_path(out, path, entry)
    return out


def _deserialize(tree: dict, specs: dict[str, QuantSpec], shapes: dict) -> dict:
    for name, spec in specs.items():
        path = module_path(name)
        entry = get_path(tree, path)
        act = ActRange(jnp.asarray(entry["act_low"]), jnp.asarray(entry["act_high"])) if "act_low" in entry else None
        if "weight" in entry:
            value = FakeQuantWeight(jnp.asarray(entry["weight"]), spec, act)
        else:
            value = QuantizedWeight(jnp.asarray(entry["codes"]), jnp.asarray(entry["scale"]),
                                    None if "zero" not in entry else jnp.asarray(entry["zero"]), act, spec,
                                    tuple(get_path(shapes, path)))
        tree = set_path(tree, path, value)
    return tree


def save(workdir: str | Path, step: int, tree: dict, cfg: ModelConfig, specs: dict[str, QuantSpec],
         info: dict[str, Any] | None = None, tokenizer_from: str | Path | None = None) -> Path:
    """Writes a compressed params tree (from `compress_params(..., storage=True)`) as checkpoint `step`."""
    workdir = Path(workdir)
    directory = (workdir / "checkpoints").resolve()
    meta = {"model": model_meta(cfg), "jaxllm_version": jaxllm.__version__,
            "compression": {"format": FORMAT, "specs": {k: dataclasses.asdict(v) for k, v in specs.items()},
                            **(info or {})}}
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False, max_to_keep=None))
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": _serialize(tree, specs)}),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    if tokenizer_from is not None and (Path(tokenizer_from) / TOKENIZER).is_file():
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tokenizer_from) / TOKENIZER, workdir / "data" / TOKENIZER)
    return directory / str(step)


def has_checkpoints(workdir: str | Path) -> bool:
    return bool(saved_steps((Path(workdir) / "checkpoints").resolve()))


def read_meta(workdir: str | Path, step: int | None = None) -> tuple[dict[str, Any], int]:
    """(meta, step) of a workdir's latest (or given) checkpoint."""
    workdir = Path(workdir)
    directory = (workdir / "checkpoints").resolve()
    steps = saved_steps(directory)
    if not steps:
        raise UserError(f"--workdir {workdir}: no checkpoint in {directory}")
    if step is not None and step not in steps:
        raise UserError(f"--step {step}: no such checkpoint in {directory}; found steps {steps}")
    step = steps[-1] if step is None else step
    manager = ocp.CheckpointManager(directory)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    return meta, step


def is_compressed_checkpoint(workdir: str | Path, step: int | None = None) -> bool:
    try:
        return "compression" in read_meta(workdir, step)[0]
    except UserError:
        return False


def load(workdir: str | Path, step: int | None = None, compute_dtype: str | None = None,
         implementation: str | None = None) -> tuple[ModelDef, dict, int]:
    """(model definition, compressed params tree, step) of a compressed checkpoint."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: directory not found")
    meta, step = read_meta(workdir, step)
    if "compression" not in meta:
        raise UserError(f"--workdir {workdir}: checkpoint {step} is not compressed (its meta has no 'compression'); "
                        "compress it with python -m jaxllm.compress, or evaluate it with python -m jaxllm.train "
                        f"--config=... --workdir={workdir} --eval-only")
    info = meta["compression"]
    if info.get("format") != FORMAT:
        raise UserError(f"--workdir {workdir}: compressed checkpoint format {info.get('format')!r}; this jaxllm "
                        f"reads format {FORMAT}")
    cfg = model_config(meta["model"])
    if compute_dtype is not None:
        cfg = dataclasses.replace(cfg, compute_dtype=compute_dtype)
    cfg.validate()
    specs = {}
    for name, values in info["specs"].items():
        spec = QuantSpec(**values)
        specs[name] = spec if implementation is None else dataclasses.replace(spec, implementation=implementation)
    manager = ocp.CheckpointManager((workdir / "checkpoints").resolve())
    try:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    model_def = ModelDef.from_config(cfg)
    tree = _deserialize(int_keys(jax.tree.map(jnp.asarray, state["params"])), specs, model_def.shapes)
    return model_def, tree, step


def load_workdir(workdir: str | Path, mesh: Any = None, step: int | None = None,
                 compute_dtype: str | None = None) -> tuple[Decoder, int]:
    """The compressed model of a workdir as a `Decoder` and its step (`jaxllm.generate.load_workdir`'s
    contract; the arrays are placed on the current device, replicated over `mesh` if one is active)."""
    model_def, tree, step = load(workdir, step, compute_dtype)
    if mesh is not None:  # compressed weights are small: every device holds them whole
        tree = jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
    return model_def.bind(tree), step
