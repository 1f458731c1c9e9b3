"""Ahead-of-time compilation for a TPU or GPU target on any machine, with the target's real compiler.

The train step `python -m jaxllm.train` would run (same config, mesh, state layout, optimizer, remat,
random-LTD) is built on *abstract* devices of the target and compiled for them: libtpu's XLA TPU
compiler for `tpu:*` targets, the CUDA plugin's XLA GPU compiler for `gpu:*` targets (the GPU's
published figures in `jaxllm/aot/gpus/*.txtpb` stand in for the device). Nothing runs; the compiled
program answers how much memory each device needs and how many FLOPs it does.

    report = compile_train_step(config, Target.parse("tpu:v5e:2x2"))
    report.fits, report.total / 2**30

Targets: `tpu:<version>:<topology>` (`tpu:v5e:2x2`, `tpu:v5p:2x2x2`, `tpu:v6e:4x4`, `tpu:v4:2x2x1`)
and `gpu:<model>:<nodes>x<gpus per node>` (`gpu:h100:1x8`, `gpu:a100-80g:48x8`). The compilers come
with `pip install "jaxllm[aot]"`; run with `JAX_PLATFORMS=cpu` (`python -m jaxllm.aot` does), so that
the compilers' plugins do not look for a local TPU or GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import memory, pipeline_plan, runtime
from jaxllm import mesh as mesh_lib
from jaxllm.data_efficiency import DataEfficiency
from jaxllm.errors import UserError
from jaxllm.ltd import LTDSetup
from jaxllm.metrics import flops_per_token
from jaxllm.pretraining import LanguageModelTraining

GPU_DESCRIPTIONS = Path(__file__).parent / "gpus"
# Published HBM per chip; the compiler keeps a little of it for itself (v5e: 15.75 of 16 GiB).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Target:
    """A device kind and topology to compile for."""

    platform: str  # "tpu" or "gpu"
    chip: str  # v5e, h100, ...
    topology: str  # TPU: "2x2"; GPU: nodes x GPUs per node, "1x8"

    @classmethod
    def parse(cls, text: str) -> Target:
        gpus = sorted(p.stem for p in GPU_DESCRIPTIONS.glob("*.txtpb"))
        forms = (f"tpu:<{'|'.join(TPU_HBM_GIB)}>:<topology> (tpu:v5e:2x2) or "
                 f"gpu:<{'|'.join(gpus)}>:<nodes>x<gpus> (gpu:h100:1x8)")
        match = re.fullmatch(r"(tpu|gpu):([\w.-]+):(\d+(?:x\d+)+)", text)
        if not match:
            raise UserError(f"--target {text!r}: expected {forms}")
        platform, chip, topology = match.groups()
        if (platform == "tpu" and chip not in TPU_HBM_GIB) or (platform == "gpu" and chip not in gpus):
            raise UserError(f"--target {text!r}: unknown {platform} {chip!r}; expected {forms}")
        if platform == "gpu" and topology.count("x") != 1:
            raise UserError(f"--target {text!r}: a GPU topology is <nodes>x<gpus per node>, e.g. 1x8")
        return cls(platform, chip, topology)

    def __str__(self) -> str:
        return f"{self.platform}:{self.chip}:{self.topology}"

    def gpu_description(self) -> str:
        return (GPU_DESCRIPTIONS / f"{self.chip}.txtpb").read_text()

    @property
    def memory_bytes(self) -> int:
        """Memory of one device: the published HBM of a TPU chip, the GPU description's device memory."""
        if self.platform == "tpu":
            return TPU_HBM_GIB[self.chip] * 2**30
        return int(re.search(r"device_memory_size:\s*(\d+)", self.gpu_description()).group(1))

    def devices(self) -> list[Any]:
        """The target's abstract devices (compile-only: nothing can run on them)."""
        from jax.experimental import topologies

        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes at once
        try:
            if self.platform == "tpu":
                # A slice smaller than one host (v5e:1x1) is its own host: libtpu's default host is 2x2x1.
                dims = tuple(int(d) for d in self.topology.split("x"))
                small = {"chips_per_host_bounds": (dims + (1, 1))[:3]} if math.prod(dims) < 4 else {}
                topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{self.chip}:{self.topology}",
                                                        **small)
            else:
                nodes, per_node = self.topology.split("x")
                topology = topologies.get_topology_desc(platform="cuda", topology_name=self.chip,
                                                        target_config=self.gpu_description(),
                                                        topology=f"1x{nodes}x{per_node}")
        except Exception as err:  # noqa: BLE001 -- a missing compiler shows up as many error types
            package = "libtpu" if self.platform == "tpu" else "jax-cuda12-plugin"
            raise UserError(f"--target {self}: cannot describe it ({type(err).__name__}: {str(err)[:300]}); "
                            f"is the compiler installed? pip install \"jaxllm[aot]\" brings {package}") from None
        return list(topology.devices)


@dataclasses.dataclass
class CompileReport:
    """Per-device figures of one compiled program (bytes, FLOPs)."""

    target: str
    devices: int
    mesh: dict[str, int]
    parameters: int  # argument bytes, by part
    optimizer_state: int
    batch: int
    arguments: int  # the compiler's figures
    outputs: int
    temporaries: int
    aliased: int  # outputs written over donated arguments
    capacity: int
    model_flops: float  # per step, all devices: 6 N per token + attention (jaxllm.metrics.flops_per_token)
    # All devices, as XLA counts the compiled program: a loop's body once, so with gradient accumulation
    # it is one micro-batch's FLOPs (plus the update), and with scanned layers one block's.
    compiled_flops: float | None
    micro_batches: int  # train.grad_accum
    scanned_layers: bool
    compile_seconds: float
    estimate: int  # `python -m jaxllm.train --dry-run`'s per-device estimate
    error: str | None = None  # the compiler's own message when it refused the program
    # Host memory the program reads and writes (`mesh.offload`), as the compiler counts it (TPU; the
    # compile-only GPU targets describe no host memory), and the state bytes placed there by the layout.
    host_arguments: int = 0
    host_outputs: int = 0
    host_temporaries: int = 0
    host_aliased: int = 0
    offloaded: int = 0
    estimate_host: int = 0  # the dry-run estimate's host total (the offloaded state terms)
    pipeline: dict[str, Any] | None = None  # the stage split and bubble (`jaxllm.pipeline_plan`), with stages

    @property
    def total(self) -> int:
        """Peak bytes a device holds: arguments, outputs not aliased to them, and temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def host_total(self) -> int:
        """Peak host bytes the program holds per device, counted like `total`."""
        return self.host_arguments + self.host_outputs - self.host_aliased + self.host_temporaries

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.capacity

    @property
    def headroom(self) -> float:
        return 1.0 - self.total / self.capacity

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"total": self.total, "host_total": self.host_total, "fits": self.fits,
                                           "headroom": self.headroom}


def abstract_batch(config: Any, mesh: Any, rows: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The pretraining batch as the train step receives it, rows over the data-parallel axes."""
    sharding = mesh_lib.batch_sharding(mesh)  # as `python -m jaxllm.train` places its batches
    return {k: jax.ShapeDtypeStruct((rows, length), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=sharding) for k in BATCH_KEYS}


def compile_train_step(config: Any, target: Target) -> CompileReport:
    """Compiles `python -m jaxllm.train`'s step of `config` for `target` (its largest shapes when a
    curriculum or random-LTD changes them; every phase of a 1-bit optimizer, keeping the largest)."""
    devices = target.devices()
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    runtime.check_batch(config, mesh)  # the checks python -m jaxllm.train makes before it builds the step
    data_parallel = mesh_lib.data_parallel_size(mesh)
    efficiency = DataEfficiency.from_config(config, data_parallel * config.train.grad_accum)
    rows, length = config.train.batch_size, config.data.seq_len
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(config, mesh, efficiency.lr_schedule() if efficiency else None)
        ltd = None
        kept = ()
        if efficiency and efficiency.ltd_layers:
            ltd = LTDSetup(efficiency.ltd_layers, config.seed, config.random_ltd.attention_implementation)
            kept = (max(efficiency.kept(t) for t in range(efficiency.total_steps)),)
        step = task.train_step(ltd)
        batch = abstract_batch(config, mesh, rows, length)
        if hasattr(step, "program"):  # a 1-bit optimizer: one jitted program per phase, kept length bound
            lowerings = [(step.program(p, *kept), ()) for p in range(len(step.training.plan.names))]
        else:
            lowerings = [(step, kept)]
        compiled, error, seconds, kernels = [], None, 0.0, []
        for program, static in lowerings:
            traced = program.trace(task.layout.abstract, batch, *static)
            done, refused, spent = compile_or_refusal(traced.lower())
            compiled += [done] if done is not None else []
            kernels += [kernel_flops(traced.jaxpr)] if done is not None else []
            error, seconds = refused or error, seconds + spent
    estimated = memory.estimate(config, task.layout, dict(mesh.shape))
    stats = [c.memory_analysis() for c in compiled]
    peak = max(stats, key=memory.compiled_total, default=None)
    flops = [compiled_flops_of(c, target, k) for c, k in zip(compiled, kernels, strict=True)]
    return CompileReport(
        target=str(target), devices=len(devices), mesh=dict(mesh.shape),
        parameters=memory.sharded_bytes(task.layout.abstract["params"]),
        optimizer_state=memory.sharded_bytes(task.layout.abstract["opt_state"]),
        batch=memory.sharded_bytes(batch),
        arguments=peak.argument_size_in_bytes if peak else 0, outputs=peak.output_size_in_bytes if peak else 0,
        temporaries=peak.temp_size_in_bytes if peak else reported_bytes(error),
        aliased=peak.alias_size_in_bytes if peak else 0, capacity=target.memory_bytes,
        model_flops=flops_per_token(config.model, length) * rows * length,
        compiled_flops=max(flops) * len(devices) if flops and None not in flops else None,
        micro_batches=config.train.grad_accum, scanned_layers=config.model.scan_layers, compile_seconds=seconds,
        estimate=estimated["total"], estimate_host=estimated["host_total"], error=error, **_host_figures(peak),
        offloaded=_offloaded_bytes(task.layout.abstract), pipeline=pipeline_plan.stage_plan(config, dict(mesh.shape)))


def _host_figures(stats: Any) -> dict[str, int]:
    fields = {"arguments": "argument", "outputs": "output", "temporaries": "temp", "aliased": "alias"}
    return {f"host_{name}": getattr(stats, f"host_{field}_size_in_bytes", 0) if stats else 0
            for name, field in fields.items()}


def _offloaded_bytes(abstract_state: Any) -> int:
    """Per-device bytes of the state leaves the layout places in host memory."""
    placed = [a for a in jax.tree.leaves(abstract_state) if a.sharding.memory_kind == mesh_lib.HOST_MEMORY]
    return memory.sharded_bytes(placed)


def compile_or_refusal(lowering: Any) -> tuple[Any | None, str | None, float]:
    """(the compiled program, or None and the compiler's out-of-memory line; compile seconds). Any other
    compiler error propagates."""
    start = time.perf_counter()
    try:
        return lowering.compile(), None, time.perf_counter() - start
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return None, str(err).splitlines()[0], time.perf_counter() - start


def compiled_flops_of(compiled: Any, target: Target, kernels: float = 0.0) -> float | None:
    """FLOPs of one device's program: XLA's cost analysis (on the optimized module for GPU, whose
    compiled executable does not report it). The TPU's counts the Pallas kernels by their cost
    estimates; the GPU's sees a Triton kernel as an opaque call, so `kernels` (`kernel_flops`) is added."""
    if target.platform == "tpu":
        return float(compiled.cost_analysis()["flops"])
    from jax._src.lib import _jax

    module = compiled.runtime_executable().hlo_modules()[0]
    return float(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)["flops"]) + kernels


def kernel_flops(jaxpr: Any) -> float:
    """The FLOPs that the Pallas kernels of a traced program declare (`pl.CostEstimate`), each loop body
    counted once, as XLA's cost analysis counts it."""
    total = 0.0
    for eqn in jaxpr.eqns:
        estimate = eqn.params.get("cost_estimate") if eqn.primitive.name == "pallas_call" else None
        total += estimate.flops if estimate is not None else 0.0
        inner = [getattr(sub, "jaxpr", sub) for value in eqn.params.values()  # ClosedJaxprs' jaxprs, or Jaxprs
                 for sub in (value if isinstance(value, (tuple, list)) else (value,))]
        counts = [kernel_flops(j) for j in inner if hasattr(j, "eqns")]
        # One branch of a `cond` runs (a kernel's per-platform variants are branches of one).
        total += (max(counts, default=0.0) if eqn.primitive.name == "cond" else sum(counts))
    return total


def reported_bytes(error: str | None) -> int:
    """The memory the compiler said it needed (`... HLO temporaries (22.96G) exceeds ...`), in bytes."""
    found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", error or "")
    if not found:
        return 0
    return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
