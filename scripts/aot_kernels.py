"""Compiles every Pallas kernel, forward and backward, for a TPU and a GPU target and prints a table.

    JAX_PLATFORMS=cpu python scripts/aot_kernels.py [--targets tpu:v5e:2x2 gpu:h100:1x8] [--small]
                                                    [--json runs/aot_kernels.json]

Each program is the public op with `implementation="auto"` (quantized matmul through a
`QuantizedWeight` and `jaxllm.ops.linear`, as the models call it), jitted under `jax.set_mesh` over
the target's abstract devices with every batch split over them, lowered and compiled by the real
compiler (libtpu for `tpu:*`, the CUDA plugin for `gpu:*`). The table gives the compile seconds on
this machine, the compiler's per-device temporaries and how many kernel custom calls the compiled
program holds (Mosaic `tpu_custom_call` / Triton `__gpu$xla.gpu.triton`): zero would mean the op fell
back to XLA. Shapes are those the models use; `--small` takes the test suite's tiny ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxllm.aot import Target
from jaxllm.compression.qtensor import QuantSpec, quantize_weight
from jaxllm.config import MeshConfig
from jaxllm.mesh import logical_to_spec, make_mesh
from jaxllm.ops.attention import causal_attention
from jaxllm.ops.evoformer import evoformer_attention
from jaxllm.ops.linear import linear
from jaxllm.ops.token_dropped_attention import token_dropped_attention

# How each compiled program names a Pallas kernel call.
KERNEL_CALLS = {"tpu": r'custom_call_target="tpu_custom_call"', "gpu": r'custom_call_target="__gpu\$xla\.gpu\.triton"'}
# Kernel calls per program: forward; backward = the gradient kernels and, for attention, the forward
# again for its residuals (the gradient of a matmul in x needs no forward).
CALLS = {"quantized matmul": (1, 1), "causal attention": (1, 3), "token-dropped attention": (1, 3),
         "evoformer attention": (1, 5)}

# Per device: the batch dimension below is multiplied by the target's device count.
MODEL_SHAPES = {
    # Llama-1B-class projections (d 2048, MLP 5632), one sequence of 2048 tokens per device, groups of 128.
    "quantized matmul": [dict(tokens=2048, k=2048, n=2048, bits=8), dict(tokens=2048, k=2048, n=5632, bits=4)],
    # Llama 1B's attention (the flash-attention kernel): 2048 tokens, 32 heads of 64 (4 key/value heads), bf16.
    "causal attention": [dict(rows=1, length=2048, heads=32, kv_heads=4, dim=64)],
    # Random-LTD at seq 2048 keeping half the tokens; 32 heads of 64 (4 key/value heads), bf16.
    "token-dropped attention": [dict(rows=1, kept=1024, heads=32, kv_heads=4, dim=64)],
    # DeepSpeed4Science's Evoformer test/benchmark shapes: N = 16 MSA rows, L = 512, 4 heads of 32, bf16.
    "evoformer attention": [dict(rows=1, msa=16, length=512, heads=4, dim=32)],
}
SMALL_SHAPES = {
    "quantized matmul": [dict(tokens=64, k=256, n=256, bits=8), dict(tokens=64, k=256, n=384, bits=4)],
    "causal attention": [dict(rows=1, length=256, heads=4, kv_heads=2, dim=64)],
    "token-dropped attention": [dict(rows=1, kept=256, heads=4, kv_heads=2, dim=64)],
    "evoformer attention": [dict(rows=1, msa=2, length=128, heads=2, dim=32)],
}


@dataclasses.dataclass(frozen=True)
class Program:
    """One op, its abstract arguments and the argument numbers its backward differentiates."""

    kernel: str
    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    grad_argnums: tuple[int, ...]


def target_mesh(target: Target):
    """A jaxllm mesh over the target's abstract devices, all of them on the data axis."""
    return make_mesh(MeshConfig(data=-1), target.devices())


def _sharded(mesh, shape, dtype, logical_axes) -> jax.ShapeDtypeStruct:
    spec = logical_to_spec(logical_axes, shape, mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _replicated(mesh, tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, jax.P())),
                        tree)


def quantized_matmul_program(mesh, tokens, k, n, bits) -> Program:
    devices = mesh.size
    spec = QuantSpec("w", weight_bits=bits, weight_groups=k * n // 128, weight_symmetric=True)
    weight = jax.eval_shape(lambda w: quantize_weight(w, spec), jax.ShapeDtypeStruct((k, n), jnp.float32))
    x = _sharded(mesh, (devices * tokens, k), jnp.bfloat16, ("batch", None))
    return Program("quantized matmul", f"{k}x{n} int{bits} g128", lambda x, w: linear(x, w, jnp.bfloat16),
                   (x, _replicated(mesh, weight)), (0,))


def _attention_inputs(mesh, rows, length, heads, kv_heads, dim):
    """bf16 q, k/v and int32 ids of `rows` sequences per device, split over the devices by rows."""
    b = mesh.size * rows
    axes = ("batch", "attn_length", None, None)
    q = _sharded(mesh, (b, length, heads, dim), jnp.bfloat16, axes)
    kv = _sharded(mesh, (b, length, kv_heads, dim), jnp.bfloat16, axes)
    return q, kv, _sharded(mesh, (b, length), jnp.int32, ("batch", "attn_length"))


def token_dropped_program(mesh, rows, kept, heads, kv_heads, dim) -> Program:
    q, kv, ids = _attention_inputs(mesh, rows, kept, heads, kv_heads, dim)

    def fn(q, k, v, segment_ids, positions, token_index):
        return token_dropped_attention(q, k, v, segment_ids, positions, token_index, compute_dtype=jnp.bfloat16)

    return Program("token-dropped attention", f"r={kept} H={heads}/{kv_heads} D={dim}", fn, (q, kv, kv, ids, ids, ids),
                   (0, 1, 2))


def causal_program(mesh, rows, length, heads, kv_heads, dim) -> Program:
    q, kv, ids = _attention_inputs(mesh, rows, length, heads, kv_heads, dim)

    def fn(q, k, v, segment_ids, positions):  # "pallas": "auto" keeps XLA's attention on TPU
        return causal_attention(q, k, v, segment_ids, positions, compute_dtype=jnp.bfloat16, implementation="pallas")

    return Program("causal attention", f"l={length} H={heads}/{kv_heads} D={dim}", fn, (q, kv, kv, ids, ids), (0, 1, 2))


def evoformer_program(mesh, rows, msa, length, heads, dim) -> Program:
    b = mesh.size * rows
    qkv = _sharded(mesh, (b, msa, length, heads, dim), jnp.bfloat16, ("batch", None, None, None, None))
    mask = _sharded(mesh, (b, msa, 1, 1, length), jnp.bfloat16, ("batch", None, None, None, None))
    pair = _sharded(mesh, (b, 1, heads, length, length), jnp.bfloat16, ("batch", None, None, None, None))

    def fn(q, k, v, mask, pair):
        return evoformer_attention(q, k, v, [mask, pair])

    return Program("evoformer attention", f"N={msa} L={length} H={heads} D={dim}", fn, (qkv, qkv, qkv, mask, pair),
                   (0, 1, 2, 3, 4))


BUILDERS = {"quantized matmul": quantized_matmul_program, "causal attention": causal_program,
            "token-dropped attention": token_dropped_program, "evoformer attention": evoformer_program}


def programs(mesh, shapes: dict[str, list[dict]]) -> list[Program]:
    return [BUILDERS[kernel](mesh, **case) for kernel, cases in shapes.items() for case in cases]


def jitted(program: Program, direction: str):
    """The forward program, or the gradient of the sum of its output (f32) in its float arguments."""
    if direction == "forward":
        return jax.jit(program.fn)

    def loss(*args):
        return jnp.sum(program.fn(*args).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=program.grad_argnums))


def compile_program(program: Program, direction: str, mesh):
    """(compiled executable, seconds) of one direction, traced and compiled under the target mesh."""
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jitted(program, direction).lower(*program.args).compile()
    return compiled, time.perf_counter() - start


def kernel_calls(compiled, platform: str) -> int:
    return len(re.findall(KERNEL_CALLS[platform], compiled.as_text()))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=["tpu:v5e:2x2", "gpu:h100:1x8"])
    parser.add_argument("--small", action="store_true", help="the test suite's tiny shapes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else MODEL_SHAPES
    rows = []
    header = (f"{'kernel':24} {'shape':26} {'direction':9} {'target':13} {'compile s':>9} {'temp MiB':>9} "
              f"{'kernel calls':>12}")
    print(header)
    print("-" * len(header))
    for text in args.targets:
        target = Target.parse(text)
        mesh = target_mesh(target)
        for program in programs(mesh, shapes):
            for direction in ("forward", "backward"):
                row = dict(kernel=program.kernel, shape=program.label, direction=direction, target=text)
                try:
                    compiled, seconds = compile_program(program, direction, mesh)
                    calls = kernel_calls(compiled, target.platform)
                    row |= dict(compile_seconds=round(seconds, 1), calls=calls,
                                expected_calls=CALLS[program.kernel][direction == "backward"],
                                temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
                    print(f"{program.kernel:24} {program.label:26} {direction:9} {text:13} {seconds:9.1f} "
                          f"{row['temp_bytes'] / 2**20:9.1f} {calls:12d}", flush=True)
                except Exception as err:  # noqa: BLE001 -- report the compiler's refusal and go on
                    row |= dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                    print(f"{program.kernel:24} {program.label:26} {direction:9} {text:13} FAILED {row['error']}",
                          flush=True)
                rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(0 if all("error" not in r for r in main()) else 1)
