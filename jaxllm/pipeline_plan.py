"""The stage split of a pipelined run (`mesh.stage` > 1), as `--dry-run` and `python -m jaxllm.aot` print it.

From the config alone: which blocks each stage holds, how a batch is cut (the engine's accumulation
micro-batches, then the pipeline's micro-batches inside each loss call), and the schedule's ticks and
bubble, taken from `jaxllm.models.pipeline` (`ticks`, `bubble_fraction`), the functions the pipelined
step itself follows.
"""

from __future__ import annotations

from typing import Any

from jaxllm.mesh import STAGE_AXIS, PipelineSettings
from jaxllm.models import pipeline
from jaxllm.optim import ONEBIT_OPTIMIZERS

BUBBLE_FORMULA = "(S-1)/(R M + S-1)"
# Past this many stages the per-stage block lists would swamp the report: the first and last stage show the rule.
LISTED_STAGES = 8


def stage_plan(config: Any, mesh_shape: dict[str, int]) -> dict[str, Any] | None:
    """The stage split and bubble of `config` on a mesh of `mesh_shape`, or None without stages. Raises
    the pipelined step's own `UserError` (naming the config key) when the layers or rows do not split."""
    stages = mesh_shape.get(STAGE_AXIS, 1)
    if stages == 1:
        return None
    settings = PipelineSettings.of(config.mesh, stages)
    layers, accum = config.model.layers, config.train.grad_accum
    # What each loss call is given: a 1-bit optimizer's step computes every data slice's gradient on
    # its own rows (`jaxllm.engine.onebit`), so there the pipeline sees one slice's share.
    slices = mesh_shape.get("data", 1) if config.optimizer.name in ONEBIT_OPTIMIZERS else 1
    rows = config.train.batch_size // accum // slices
    pipeline.check_settings(settings, layers, rows)
    repeats, micro = settings.repeats, settings.microbatches
    per_group, padded = pipeline.slots(layers, stages * repeats)
    blocks = pipeline.group_blocks(layers, settings)
    data_parallel = mesh_shape.get("data", 1) // slices * mesh_shape.get("fsdp", 1)
    return {
        "stages": stages,
        "schedule": settings.schedule,
        "layer_groups_per_stage": repeats,  # R
        "blocks_per_group": per_group,  # K = ceil(layers / (S R)) block slots
        "blocks_per_stage": repeats * per_group,
        "layers": layers,
        "padded_slots": padded,  # S R K - layers: one at the end of each of the last groups
        "stage_blocks": blocks,  # [stage][group] = [first, last] block index, None for padding only
        "accumulation_microbatches": accum,  # train.grad_accum: loss calls per step
        "rows_per_accumulation_microbatch": rows,  # per data slice with a 1-bit optimizer
        "per_data_slice": slices > 1,
        "pipeline_microbatches": micro,  # M, per loss call
        "rows_per_pipeline_microbatch": rows // micro,
        "data_parallel": data_parallel,  # data x fsdp: the devices a pipeline micro-batch's rows split over
        "ticks": pipeline.ticks(settings),  # T = R M + S - 1
        "busy_ticks": repeats * micro,
        "bubble_formula": BUBBLE_FORMULA,
        "bubble": pipeline.bubble_fraction(settings),
    }


def _blocks_text(groups: list[list[int] | None]) -> str:
    return ", ".join("padding" if g is None else f"{g[0]}" if g[0] == g[1] else f"{g[0]}-{g[1]}" for g in groups)


def _rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def describe(plan: dict[str, Any], indent: str = "") -> list[str]:
    """The report's lines for a stage plan."""
    s, r, m = plan["stages"], plan["layer_groups_per_stage"], plan["pipeline_microbatches"]
    k = plan["blocks_per_group"]
    shown = range(s) if s <= LISTED_STAGES else (0, s - 1)
    per_stage = "; ".join(f"stage {i}: blocks {_blocks_text(plan['stage_blocks'][i])}" for i in shown)
    lines = [
        f"pipeline: {s} stages, {plan['schedule']} schedule, {r} layer group{'s' * (r > 1)} of {k} "
        f"block{'s' * (k > 1)} per stage " + (f"({plan['blocks_per_stage']} block slots per stage for "
                                              f"{plan['layers']} blocks)" if plan["padded_slots"] else
                                              f"({plan['blocks_per_stage']} of {plan['layers']} blocks per stage)"),
        f"  {per_stage}" + ("" if s <= LISTED_STAGES or plan["padded_slots"] else
                            f"; block (r S + s) {k} + k for stage s"),
        f"  micro-batches: {plan['accumulation_microbatches']} for accumulation (train.grad_accum) of "
        f"{_rows(plan['rows_per_accumulation_microbatch'])}{' per data slice' if plan['per_data_slice'] else ''}, "
        f"each cut into {m} pipeline micro-batches "
        f"(mesh.pipeline_microbatches) of {_rows(plan['rows_per_pipeline_microbatch'])}",
        f"  ticks T = R M + S - 1 = {r}*{m} + {s} - 1 = {plan['ticks']}, each stage busy {plan['busy_ticks']}; "
        f"bubble {BUBBLE_FORMULA} = {s - 1}/{plan['ticks']} = {plan['bubble']:.4f}",
    ]
    if plan["padded_slots"]:
        slots = s * r * k
        lines.append(f"  padded: {plan['padded_slots']} of {slots} block slots (the last of each of the last "
                     f"{plan['padded_slots']} layer groups) run on zeros and are skipped, "
                     f"{plan['padded_slots']}/{slots} of the block compute")
    rows, split = plan["rows_per_pipeline_microbatch"], plan["data_parallel"]
    if rows % split:
        lines.append(f"  note: a pipeline micro-batch of {_rows(rows)} cannot be split evenly over data x fsdp = "
                     f"{split} devices (lower mesh.pipeline_microbatches or raise train.batch_size)")
    return [indent + line for line in lines]
