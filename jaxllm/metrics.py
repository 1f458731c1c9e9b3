"""FLOPs, MFU and throughput, and the run's metric writers (JSONL, TensorBoard, progress bar).

MFU convention: model FLOPs per trained token = 6 * (non-embedding params + unembedding params)
+ 12 * layers * seq_len * d_model (attention scores and values, forward and backward, without the
causal halving). MFU = achieved model FLOP/s / peak FLOP/s of the devices. On CPU the peak is
measured once per process with a large matmul in the run's compute dtype; on accelerators it comes
from the vendor's dense peak for that dtype.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.data.jsonl import write_atomic
from jaxllm.models.decoder import count_params


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    counts = count_params(cfg)
    dense = 6 * (counts["non_embedding"] + counts["unembedding"])
    attention = 12 * cfg.layers * seq_len * cfg.d_model
    return float(dense + attention)


# Dense peak FLOP/s per chip from vendor data sheets (no sparsity): (bf16, f32).
_ACCELERATOR_PEAKS = {
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "TPU v4": (275e12, 275e12 / 4),
    "TPU v5 lite": (197e12, 197e12 / 4),
    "TPU v5e": (197e12, 197e12 / 4),
    "TPU v5p": (459e12, 459e12 / 4),
    "TPU v6 lite": (918e12, 918e12 / 4),
}


@functools.cache
def measure_cpu_peak(dtype_name: str, size: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of a `size`^3 matmul on the host (bf16 inputs accumulate in f32)."""
    dtype = jnp.dtype(dtype_name)
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), dtype), cpu)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype_name: str, devices: list[jax.Device] | None = None) -> tuple[float, str]:
    """Total peak FLOP/s of `devices` and a word on where the number comes from."""
    devices = devices or jax.devices()
    if devices[0].platform == "cpu":
        # Fake CPU devices share the host's cores: the host peak is the peak of all of them together.
        return measure_cpu_peak(dtype_name), f"measured host {dtype_name} matmul"
    kind = devices[0].device_kind
    for name, (bf16, f32) in _ACCELERATOR_PEAKS.items():
        if name.lower() in kind.lower():
            per_chip = bf16 if dtype_name == "bfloat16" else f32
            return per_chip * len(devices), f"{kind} data sheet x {len(devices)}"
    return math.nan, f"unknown peak for {kind}"


class MetricsWriter:
    """Writes metric rows to `metrics.jsonl` and TensorBoard, and to the console: the progress bar shows
    the run's headline figures (the eval loss too, once there is one), and without a bar every row is
    printed as one plain line (multi-host and batch jobs keep a readable log).

    Only the process that owns the writer (process 0) should create one.
    """

    # What the bar shows by default: row key -> (label, format).
    DEFAULT_HEADLINE = {"loss": ("loss", "{:.3f}"), "eval_loss": ("eval", "{:.3f}"),
                        "tokens_per_sec": ("tok_s", "{:.0f}"), "mfu": ("mfu", "{:.1%}")}

    def __init__(self, workdir: Path, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress_bar: bool = True, headline: tuple[str, ...] | None = None):
        self.path = workdir / "metrics.jsonl"
        self.total_steps = total_steps
        self.headline = ({k: (k, "{:.3g}") for k in headline} if headline is not None
                         else self.DEFAULT_HEADLINE)
        self._shown: dict[str, str] = {}
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        self._bar = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["step"])
        if self._bar is None:
            print(console_line(row, self.total_steps), flush=True)
            return
        for key, (label, fmt) in self.headline.items():
            if isinstance(row.get(key), (int, float)):
                self._shown[label] = fmt.format(row[key])
        if self._shown:
            self._bar.set_postfix(self._shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def console_line(row: dict[str, Any], total_steps: int) -> str:
    """A metrics row as one line: `step 20/100 | loss 2.313 | lr 0.001 | ...` (4 significant digits)."""
    cells = [f"step {row['step']}/{total_steps}"]
    for key, value in row.items():
        if key != "step":
            cells.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(cells)


def truncate_after(path: Path, step: int) -> None:
    """Drops rows logged after `step` (they are recomputed on resume), replacing the file atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, (line + "\n" for line in kept))
