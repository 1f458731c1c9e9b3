"""The compression pipeline `python -m jaxllm.compress` drives: ZeroQuant PTQ, LKD and XTC on a trained
checkpoint, its compressed checkpoint and the evaluation of both (see `jaxllm/compression/__main__.py`
for the command)."""


from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxllm import generate as generate_lib
from jaxllm import mesh as mesh_lib
from jaxllm.compression import checkpoint, xtc, zeroquant
from jaxllm.compression import model as cmodel
from jaxllm.compression import rules as rules_lib
from jaxllm.config import Config
from jaxllm.data.pipeline import make_eval_batches, make_train_iterator
from jaxllm.data.sources import build_sources, token_directory
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef

COMMANDS = ("ptq", "lkd", "xtc", "eval", "generate")
XTC_RUN = "xtc_training"  # OUT/xtc_training: the distillation run's checkpoints and metrics.jsonl


def compression_rules(config: Config) -> tuple[list[rules_lib.Rule], tuple[int, ...] | None]:
    """Rules from `compression.deepspeed_config` (first) and `compression.rules`, and the teacher layers
    kept by layer reduction (the config's `layer_reduction` wins over the DeepSpeed file's)."""
    section = config.compression
    rules: list[rules_lib.Rule] = []
    teacher_layers = None
    if section.deepspeed_config:
        try:
            ds = json.loads(Path(section.deepspeed_config).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"config key 'compression.deepspeed_config': '{section.deepspeed_config}' is not valid "
                            f"JSON ({err})") from None
        recipe = rules_lib.from_deepspeed(ds)
        rules += recipe.rules
        teacher_layers = recipe.teacher_layers
    for name, r in section.rules.items():
        rules.append(rules_lib.Rule(tuple(r.modules), weight_bits=r.weight_bits, weight_groups=r.weight_groups,
                                    weight_symmetric=r.weight_symmetric, act_bits=r.act_bits,
                                    act_symmetric=r.act_symmetric, act_static=r.act_range == "static",
                                    name=f"compression.rules.{name}"))
    if section.layer_reduction.enabled:
        if not section.layer_reduction.teacher_layer:
            raise UserError("config key 'compression.layer_reduction.teacher_layer': required when "
                            "compression.layer_reduction.enabled")
        teacher_layers = tuple(section.layer_reduction.teacher_layer)
    if not rules:
        raise UserError("config key 'compression.rules': no compression rules; set compression.rules or "
                        "compression.deepspeed_config")
    return rules, teacher_layers


@dataclasses.dataclass
class Teacher:
    model_def: ModelDef
    params: dict
    step: int
    workdir: Path


def load_teacher(workdir: str | Path, step: int | None = None, flag: str = "--teacher") -> Teacher:
    """A training workdir's f32 parameters on the first device."""
    if checkpoint.is_compressed_checkpoint(workdir, step):
        raise UserError(f"{flag} {workdir}: holds a compressed checkpoint; give the f32 training run")
    mesh = mesh_lib.one_replica_mesh()
    with jax.set_mesh(mesh):
        model, step = generate_lib.load_workdir(workdir, mesh, step)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return Teacher(ModelDef.from_config(model.cfg), params, step, Path(workdir))


class Data:
    """The config's rows, read from the teacher's (or `data_workdir`'s) token shards."""

    def __init__(self, config: Config, data_workdir: Path):
        self.config = config
        self.shard_dir = token_directory(config, data_workdir)
        self.train_rows, self.eval_rows = build_sources(config, self.shard_dir)

    def train_batches(self, count: int) -> list[dict[str, Any]]:
        """The first `count` batches of training rows, in order (calibration and LKD)."""
        return make_eval_batches(self.train_rows, self.config.train.batch_size, count,
                                 what="the training rows used for calibration")

    def train_iterator(self):
        return make_train_iterator(self.train_rows, self.config.train.batch_size, self.config.seed)

    def eval_batches(self) -> list[dict[str, Any]]:
        if self.eval_rows is None:
            return []
        return make_eval_batches(self.eval_rows, self.config.train.batch_size, self.config.eval.batches)


def _log(message: str) -> None:
    print(message, flush=True)


def compress(command: str, config: Config, teacher: Teacher, out: Path, student: Teacher | None = None,
             log=_log) -> dict[str, Any]:
    """Runs `ptq`, `lkd` or `xtc` and saves the compressed checkpoint; returns a summary.

    `student` (xtc only): start the student from this run's weights instead of the teacher's layers.
    """
    config = dataclasses.replace(config, model=teacher.model_def.bind(teacher.params).cfg)
    rules, teacher_layers = compression_rules(config)
    data = Data(config, teacher.workdir)
    section = config.compression
    started = time.perf_counter()
    info: dict[str, Any] = {"method": command, "teacher": str(teacher.workdir.resolve()), "teacher_step": teacher.step,
                            "data_dir": None if data.shard_dir is None else str(Path(data.shard_dir).resolve())}
    if student is not None and command != "xtc":
        raise UserError(f"--student applies to the xtc command, not {command}")
    if command == "xtc":
        if student is not None:
            if teacher_layers is not None:
                raise UserError("--student and compression.layer_reduction both choose the student; use one")
            student_cfg, student = student.model_def.bind(student.params).cfg, student.params
        elif teacher_layers is not None:
            student, student_cfg = cmodel.reduce_layers(teacher.params, config.model, teacher_layers)
        else:
            student_cfg, student = config.model, teacher.params
        cmodel.check_compatible(config.model, student_cfg)
        student_def = ModelDef.from_config(student_cfg)
        specs = rules_lib.plan(student_cfg, rules, rules_lib.module_shapes(student_def.shapes, student_cfg),
                               section.implementation)
        if config.optimizer.name != "adamw":
            raise UserError(f"config key 'optimizer.name': XTC trains with adamw, got {config.optimizer.name!r}")
        maps = xtc.layer_maps(config.model.layers, student_cfg.layers, teacher_layers)
        ranges = zeroquant.calibrate(student_def, student, specs, data.train_batches(section.calibration_batches))
        kd = section.kd
        result = xtc.train_student(config, out / XTC_RUN, teacher.model_def, teacher.params, student_def, student,
                                   specs, data.train_iterator(), maps,
                                   xtc.KDWeights(kd.logits, kd.attention, kd.hidden, kd.lm), ranges)
        tree = cmodel.store_params(result.student, specs, result.ranges)
        info |= {"teacher_layers": None if teacher_layers is None else list(teacher_layers),
                 "layer_maps": maps._asdict(), "history": result.history}
    else:
        if teacher_layers is not None:
            raise UserError("config key 'compression.layer_reduction': layer reduction needs training; use the xtc "
                            "command")
        student_cfg, student_def = config.model, teacher.model_def
        specs = rules_lib.plan(student_cfg, rules, rules_lib.module_shapes(teacher.model_def.shapes, student_cfg),
                               section.implementation)
        student = teacher.params
        calibration = data.train_batches(section.calibration_batches)
        if command == "lkd":
            lkd = section.lkd
            ranges = zeroquant.calibrate(student_def, student, specs, calibration)
            student, report = zeroquant.lkd(student_def, teacher.params, student, specs,
                                            data.train_batches(lkd.batches), steps=lkd.steps, learning_rate=lkd.lr,
                                            weight_decay=lkd.weight_decay, ranges=ranges, log=log)
            info["lkd"] = report._asdict()
        tree, _ = zeroquant.ptq(student_def, student, specs, calibration)
    info["seconds"] = time.perf_counter() - started
    saved = checkpoint.save(out, teacher.step, tree, student_cfg, specs, info, tokenizer_from=teacher.workdir / "data")
    summary = {"command": command, "checkpoint": str(saved), "modules": len(specs),
               "teacher_weight_bytes": cmodel.weight_bytes(teacher.params), "weight_bytes": cmodel.weight_bytes(tree),
               "seconds": info["seconds"]}
    eval_batches = data.eval_batches()
    if eval_batches:
        summary["teacher_eval"] = cmodel.evaluate(teacher.model_def, teacher.params, eval_batches)
        summary["eval"] = cmodel.evaluate(student_def, tree, eval_batches)
    return summary


def evaluate_workdir(config: Config, workdir: Path, step: int | None = None) -> dict[str, Any]:
    """Eval loss and perplexity of a compressed checkpoint on the config's eval rows."""
    model_def, tree, step = checkpoint.load(workdir, step)
    meta, _ = checkpoint.read_meta(workdir, step)
    config = dataclasses.replace(config, model=model_def.bind(tree).cfg)
    data_dir = meta["compression"].get("teacher")
    data = Data(config, Path(data_dir) if data_dir else workdir)
    batches = data.eval_batches()
    if not batches:
        raise UserError("config key 'data.eval_fraction': the config's data has no eval rows to evaluate on")
    return {"step": step, **cmodel.evaluate(model_def, tree, batches)}
