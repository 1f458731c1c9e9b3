"""Pipeline bubble on 8 fake CPU devices: the step time with stages against the same step without them.

    python scripts/bench_pipeline.py [--d-model 256] [--length 128] [--rows 32] [--calls 3]

A GPT-2 of 8 layers, loss and gradients under `jax.jit`, placed as training places them. Each row gives
the median time of `--calls` calls after compiling, `1 - t1/t` (the share of the step spent beyond the
run without stages, t1) and the schedule's bubble `(S - 1) / (R M + S - 1)`
(`jaxllm.models.pipeline.bubble_fraction`). An idle tick computes on a discarded activation, so on
devices that share the same cores the two agree when each tick carries enough work. docs/pipeline.md
records the figures.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxllm.config import MeshConfig, ModelConfig  # noqa: E402
from jaxllm.mesh import PipelineSettings, make_mesh, tree_shardings  # noqa: E402
from jaxllm.models.definition import ModelDef, init_params  # noqa: E402
from jaxllm.models.pipeline import bubble_fraction  # noqa: E402

MESHES = [("data 8 (no stages)", dict(data=8))] + [
    (f"stage 4, data 2, gpipe, M={m}", dict(stage=4, data=2, pipeline_microbatches=m)) for m in (2, 4, 8)] + [
    (f"stage 4, data 2, circular R=2, M={m}",
     dict(stage=4, data=2, pipeline_schedule="circular", pipeline_repeats=2, pipeline_microbatches=m)) for m in (4, 8)]


def step_seconds(model: ModelDef, params, tokens, mesh, calls: int) -> float:
    def loss(p):
        logits = model.bind(p)(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    placed = jax.device_put(params, tree_shardings(mesh, model.logical_axes, model.shapes))
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss))
        jax.block_until_ready(step(placed))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            jax.block_until_ready(step(placed))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    cfg = ModelConfig(family="gpt2", layers=8, d_model=args.d_model, heads=4, vocab_size=512,
                      max_len=args.length + 1)
    model, params = ModelDef.from_config(cfg), init_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.rows, args.length + 1)),
                         jnp.int32)
    print(f"GPT-2, 8 layers, d_model {args.d_model}, {args.rows} rows of {args.length} tokens, "
          f"{len(jax.devices())} {jax.devices()[0].platform} devices")
    print("| mesh | ms per step | 1 - t1/t | schedule bubble |\n|---|---:|---:|---:|")
    baseline = None
    for name, keys in MESHES:
        seconds = step_seconds(model, params, tokens, make_mesh(MeshConfig(**keys), jax.devices()), args.calls)
        if baseline is None:
            baseline = seconds
            print(f"| {name} | {seconds * 1e3:.0f} | - | - |", flush=True)
            continue
        settings = PipelineSettings(keys["stage"], keys.get("pipeline_schedule", "gpipe"),
                                    keys.get("pipeline_repeats", 1), keys["pipeline_microbatches"])
        print(f"| {name} | {seconds * 1e3:.0f} | {1 - baseline / seconds:.3f} | {bubble_fraction(settings):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
