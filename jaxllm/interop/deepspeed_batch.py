"""DeepSpeed's three batch keys -> `train.batch_size` and `train.grad_accum` (for `jaxllm.interop.deepspeed`).

DeepSpeed ties them together with the data-parallel world size W:

    train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * W

jaxllm's `train.batch_size` is the same global batch and `train.grad_accum` the same accumulation, so
each device takes `batch_size / (grad_accum * W)` rows per micro-batch. When the file gives the micro
batch but not the accumulation, the accumulation depends on W, which a ds_config does not hold: it
comes from `--devices N` (all N devices hold different rows unless `mesh.tensor`/`mesh.sequence` say
otherwise) or from a mesh whose axes are all fixed. Without either, one device is assumed, which keeps
DeepSpeed's per-device micro-batch (and so its activation memory) and is reported.

`"auto"` (the Hugging Face Trainer's placeholder) takes the value from a `train.batch_size` /
`train.grad_accum` override, or from the other two keys, or leaves jaxllm's default; each is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from jaxllm import config as config_lib
from jaxllm.errors import UserError
from jaxllm.interop.deepspeed_translation import AUTO

BATCH, MICRO, ACCUM = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
MESH_AXES = ("data", "fsdp", "tensor", "sequence")

Note = Callable[[str, str], None]


def data_parallel_size(mesh: Mapping[str, Any], devices: int | None) -> int | None:
    """How many devices hold different batch rows (mesh.data x mesh.fsdp), or None when unknown.

    `mesh` holds the config's mesh values (missing axes take MeshConfig's defaults); one axis may be -1
    (all devices left), which `devices` resolves.
    """
    defaults = config_lib.MeshConfig()
    sizes = {axis: mesh.get(axis, getattr(defaults, axis)) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    free = [axis for axis, size in sizes.items() if size == -1]
    if devices is not None and devices <= 0:
        raise UserError(f"--devices: got {devices}; expected a positive number of devices")
    if not free:
        if devices is not None and devices != fixed:
            raise UserError(f"--devices={devices}: the mesh {sizes} covers {fixed} devices; make them agree")
        return sizes["data"] * sizes["fsdp"]
    if devices is None:
        return None
    if devices % fixed:
        raise UserError(f"--devices={devices} does not divide over the fixed mesh axes {sizes} ({fixed} devices)")
    sizes[free[0]] = devices // fixed
    return sizes["data"] * sizes["fsdp"]


def _positive(ds: Mapping[str, Any], key: str) -> int | None:
    """The key's integer value; None when absent or "auto"."""
    value = ds.get(key)
    if value is None or value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"DeepSpeed config '{key}': got {value!r}; expected a positive integer or \"auto\"")
    return value


def translate_batch(ds: Mapping[str, Any], options: Mapping[str, Any], world: int | None,
                    note: Note) -> dict[str, int]:
    """The `train` keys (`batch_size`, `grad_accum`) the batch keys of `ds` give.

    `options` holds the command line's `train.batch_size` / `train.grad_accum` (they win over the file
    and fill its "auto"), `world` the data-parallel size (None: not known). `note(key, reason)` records
    what is not exact.
    """
    if not any(key in ds for key in (BATCH, MICRO, ACCUM)):
        return {}
    file_batch, micro, file_accum = _positive(ds, BATCH), _positive(ds, MICRO), _positive(ds, ACCUM)
    batch = options.get("batch_size", file_batch)
    accum = options.get("grad_accum", file_accum)
    from_command_line = "batch_size" in options or "grad_accum" in options
    assumed = False
    if micro is not None and world is None and (batch is None or accum is None):
        world, assumed = 1, True
    if batch is not None and accum is not None:
        if batch % accum:
            raise UserError(f"DeepSpeed config '{BATCH}': {batch} is not a multiple of {ACCUM}={accum}")
        if micro is not None:
            _check_micro(batch // accum, micro, world, from_command_line, note)
    elif batch is not None:
        accum = None if micro is None else 1  # None: DeepSpeed's and jaxllm's default of 1, set below
        if micro is not None:
            accum, rest = divmod(batch, micro * world)
            if rest or not accum:
                raise UserError(f"DeepSpeed config '{BATCH}': {batch} is not a multiple of {MICRO}={micro} x "
                                f"{world} data-parallel device(s); pass --devices=N so that N x {micro} divides it")
    elif micro is not None:
        accum = accum or 1
        batch = micro * accum * world
    if assumed:
        note(MICRO, f"train.batch_size={batch} with train.grad_accum={accum} assumes one device ({micro} rows per "
                    f"micro-batch, as in DeepSpeed); on N devices pass --devices=N for grad_accum = "
                    f"{batch} / ({micro} x N)")
    _note_auto(ds, options, batch, accum, note)
    if batch is not None and accum is None:
        accum = 1
    if world is not None and batch is not None and not assumed and (batch // accum) % world:
        raise UserError(f"DeepSpeed config '{BATCH}': {batch} rows / grad_accum {accum} do not divide over "
                        f"{world} data-parallel devices")
    return {k: v for k, v in (("batch_size", batch), ("grad_accum", accum)) if v is not None}


def _check_micro(rows: int, micro: int, world: int | None, from_command_line: bool, note: Note) -> None:
    """All three sizes are known: DeepSpeed requires rows = micro x world, which fixes or checks world."""
    if world is None:
        if rows % micro:
            raise UserError(f"DeepSpeed config '{MICRO}': {micro} does not divide the {rows} rows of a micro-batch "
                            f"({BATCH} / {ACCUM})")
        note(MICRO, f"{rows} rows per micro-batch over {micro} per device: the file is meant for {rows // micro} "
                    "data-parallel devices; on others each device takes a different share")
    elif rows != micro * world:
        if not from_command_line:
            raise UserError(f"DeepSpeed config '{BATCH}': {rows} rows per micro-batch != {MICRO} {micro} x {world} "
                            "data-parallel devices (DeepSpeed refuses this too); fix --devices or the file")
        note(MICRO, f"each device takes {rows / world:g} rows per micro-batch, not {micro}: train.batch_size / "
                    "train.grad_accum come from the command line")


def _note_auto(ds: Mapping[str, Any], options: Mapping[str, Any], batch: int | None, accum: int | None,
               note: Note) -> None:
    defaults = config_lib.TrainConfig()
    for key, option, value in ((BATCH, "batch_size", batch), (ACCUM, "grad_accum", accum)):
        if ds.get(key) != AUTO:
            continue
        if option in options:
            note(key, f"auto: train.{option}={options[option]} from the command line")
        elif value is not None:
            note(key, f"auto: train.{option}={value} from the other batch keys")
        else:
            note(key, f"auto: train.{option} keeps jaxllm's default ({getattr(defaults, option)}); set "
                      f"train.{option}=N")
    if ds.get(MICRO) == AUTO:
        note(MICRO, "auto: each device takes train.batch_size / (train.grad_accum x devices) rows")
