"""The generation programs of `python -m jaxllm.generate`, compiled ahead of time for a TPU or GPU target.

Two programs are compiled, with the model's parameters placed as the command places them on a
tensor-parallel mesh of the target's abstract devices (`jaxllm.mesh.one_replica_mesh`):

- **generate**: the very `jit` program the command runs (`jaxllm.generate.generate_jit`): prefill of
  `batch` left-padded prompts of `prompt_len` tokens into a KV cache of `cache_len = prompt_len +
  max_new_tokens` slots, then a `lax.while_loop` sampling one token per row per step (greedy). The
  cache lives inside the program, among its temporaries. Whether it fits is the command's answer.
- **decode step**: one iteration of that loop alone, `Decoder.decode` on one token per row with the
  cache passed in and donated, as a serving loop would call it: the cache is among its arguments, and
  its FLOPs are those of one generated token.

Weights: `quantize="none"` keeps the f32 parameters, sharded over `tensor` like a training checkpoint
restored by the command. `"w8a8"` is ZeroQuant's W8A8 (`W8A8_RULES`: every block matmul int8 in 64
groups with token-wise int8 activations, the token embedding int8 per row, the LM head f32), and
`"config"` the config's `compression:` section, each planned and quantized as `python -m jaxllm.compress
ptq` stores it (abstractly: only shapes and dtypes) and replicated on every device, as the command
loads a compressed checkpoint. Quantized matmuls take the XLA path (`implementation: xla`): integer
dots (`jaxllm.compression.linear.integer_matmul`) that the compiled program shows and the report counts;
the Pallas kernel path compiles for these targets too (docs/aot.md) but is one opaque custom call.

Per-token model FLOPs, with `P` dense matmul parameters (`count_params`: non-embedding and unembedding),
`L` cache slots and `H` query heads of `d_h` each: `2 P + 4 layers L H d_h` (every query reads every
slot of the cache, masked or not); the prefill computes the head for the last position only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import memory
from jaxllm import mesh as mesh_lib
from jaxllm.aot import Target, compile_or_refusal, compiled_flops_of, hlo, reported_bytes
from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.errors import UserError
from jaxllm.generate import Sampling, lower_generate, prompt_width
from jaxllm.models.decoder import CACHE_AXES, KVCache, count_params
from jaxllm.models.definition import ModelDef

QUANTIZE = ("none", "w8a8", "config")
W8A8_GROUPS = 64
GIB = 2**30


def w8a8_rules() -> list[Any]:
    """ZeroQuant's W8A8 as compression rules: block matmuls int8 (64 groups) with int8 token-wise inputs."""
    from jaxllm.compression.rules import Rule

    return [Rule((r"attn\.w[qkvo]$", r"mlp\.w_(in|gate|out)$"), weight_bits=8, weight_groups=W8A8_GROUPS,
                 act_bits=8, name="w8a8"),
            Rule((r"^embed$",), weight_bits=8, name="embedding")]


@dataclasses.dataclass
class ProgramFigures:
    """The compiler's per-device figures of one program (bytes; FLOPs of all devices)."""

    arguments: int = 0
    outputs: int = 0
    temporaries: int = 0
    aliased: int = 0
    compiled_flops: float | None = None
    compile_seconds: float = 0.0
    error: str | None = None  # the compiler's message when it refused the program

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


@dataclasses.dataclass
class GenerateReport:
    """Per-device figures of the generation programs for one target, batch and cache length."""

    target: str
    devices: int
    mesh: dict[str, int]
    quantize: str
    batch: int
    prompt_len: int  # the padded prompt width the command compiles for
    max_new_tokens: int
    cache_len: int
    parameters: int  # per device, from the shardings
    kv_cache: int  # per device: keys and values of every layer
    capacity: int
    generate: ProgramFigures
    decode_step: ProgramFigures
    model_flops_prefill: float
    model_flops_step: float  # one new token per row
    # The W8A8 program's matrix products in the optimized HLO (None for a dense model).
    integer_products: int | None = None
    float_products: int | None = None
    dequantized_products: int | None = None  # float products reading a quantized weight's shape

    @property
    def total(self) -> int:
        return max(self.generate.total, self.decode_step.total)

    @property
    def fits(self) -> bool:
        return self.generate.error is None and self.decode_step.error is None and self.total <= self.capacity

    @property
    def headroom(self) -> float:
        return 1.0 - self.total / self.capacity

    def to_dict(self) -> dict[str, Any]:
        programs = {name: dataclasses.asdict(getattr(self, name)) | {"total": getattr(self, name).total}
                    for name in ("generate", "decode_step")}
        return dataclasses.asdict(self) | programs | {"total": self.total, "fits": self.fits,
                                                      "headroom": self.headroom}


def generation_flops(cfg: ModelConfig, batch: int, prompt_len: int, cache_len: int) -> tuple[float, float]:
    """Model FLOPs of the prefill and of one decode step (see the module docstring)."""
    counts = count_params(cfg)
    attention = 4 * cfg.layers * cache_len * cfg.heads * cfg.head_dim
    prefill = batch * (prompt_len * (2 * counts["non_embedding"] + attention) + 2 * counts["unembedding"])
    step = batch * (2 * (counts["non_embedding"] + counts["unembedding"]) + attention)
    return float(prefill), float(step)


def decode_step(graphdef: Any) -> Any:
    """The generation loop's model call alone, jitted: `(params, tokens [batch, 1], cache) -> (logits,
    cache)` through `Decoder.decode`, the cache donated (updated in place)."""
    return jax.jit(lambda params, tokens, cache: nnx.merge(graphdef, params).decode(tokens, cache), donate_argnums=2)


def _quantized_params(config: Any, model_def: ModelDef, quantize: str) -> tuple[Any, list[tuple[int, int]]]:
    """The compressed parameter tree as `ShapeDtypeStruct`s, and the `[K, N]` shapes of the quantized codes
    that matmuls read."""
    from jaxllm.compression import model as cmodel
    from jaxllm.compression import rules as rules_lib
    from jaxllm.compression.qtensor import QuantizedWeight, matrix_shape

    cfg = config.model
    if quantize == "w8a8":
        rules = w8a8_rules()
    else:
        from jaxllm.compression.pipeline import compression_rules

        rules, teacher_layers = compression_rules(config)
        if teacher_layers is not None:
            raise UserError("config key 'compression.layer_reduction': a reduced student is another model; "
                            "compile its own config (model.layers) instead")
    # The XLA path, whose integer dots the report counts (the Pallas kernel is one opaque custom call).
    specs = rules_lib.plan(cfg, rules, rules_lib.module_shapes(model_def.shapes, cfg), "xla")
    ranges = cmodel.static_ranges(specs)
    tree = jax.eval_shape(lambda p: cmodel.compress_params(p, specs, storage=True, ranges=ranges),
                          jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), model_def.shapes,
                                       is_leaf=lambda x: isinstance(x, tuple)))
    # The codes that matmuls read: an untied model only looks rows of its embedding up.
    codes = [matrix_shape(w.spec, w.shape) for w in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(
        x, QuantizedWeight)) if isinstance(w, QuantizedWeight) and (cfg.tied or w.spec.name != "embed")]
    return tree, codes


def _compile(lowering: Any, target: Target) -> tuple[Any, ProgramFigures]:
    compiled, error, seconds = compile_or_refusal(lowering)
    if compiled is None:
        return None, ProgramFigures(temporaries=reported_bytes(error), error=error, compile_seconds=seconds)
    stats = compiled.memory_analysis()
    return compiled, ProgramFigures(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes,
                                    stats.alias_size_in_bytes, compiled_flops_of(compiled, target), seconds)


def check_shape(cfg: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int) -> None:
    """Raises UserError for sizes `python -m jaxllm.generate` could not run."""
    for name, value in (("--batch", batch), ("--prompt-len", prompt_len), ("--max-new-tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} {value!r}: expected a positive integer")
    if prompt_len + max_new_tokens > cfg.max_len:
        raise UserError(f"--prompt-len {prompt_len} + --max-new-tokens {max_new_tokens} = "
                        f"{prompt_len + max_new_tokens} tokens exceed model.max_len={cfg.max_len}")


def compile_generate_step(config: Any, target: Target, *, batch: int = 1, prompt_len: int | None = None,
                          max_new_tokens: int | None = None, tensor: int | None = None,
                          quantize: str = "none") -> GenerateReport:
    """Compiles `python -m jaxllm.generate`'s program for `config.model` and `target`, and one decode step.

    batch: prompts per call; prompt_len: their length (padded up to a multiple of 16 as the command
    pads, within max_len); max_new_tokens: tokens to generate (default: fill `model.max_len`), so the
    KV cache has `prompt width + max_new_tokens` slots; tensor: tensor-parallel degree, the command's
    `--tensor` (default: every device of the target); quantize: "none", "w8a8" or "config".
    """
    cfg = config.model
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize!r}: expected one of {', '.join(QUANTIZE)}")
    prompt_len = max(cfg.max_len // 4, 1) if prompt_len is None else prompt_len
    max_new_tokens = cfg.max_len - prompt_len if max_new_tokens is None else max_new_tokens
    check_shape(cfg, batch, prompt_len, max_new_tokens)
    width = prompt_width(prompt_len, cfg.max_len, max_new_tokens)
    cache_len = width + max_new_tokens
    devices = target.devices()
    tensor = len(devices) if tensor is None else tensor
    if isinstance(tensor, bool) or not isinstance(tensor, int) or not 1 <= tensor <= len(devices):
        raise UserError(f"--tensor {tensor!r}: expected 1 to the target's {len(devices)} devices")
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=tensor, sequence=1), devices[:tensor])
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh):
        model_def = ModelDef.from_config(cfg)
        codes = []
        if quantize == "none":  # as `jaxllm.generate.load_workdir` restores a training checkpoint
            params = mesh_lib.tree_shardings(mesh, model_def.logical_axes, model_def.shapes)
            params = jax.tree.map(lambda s, shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s), params,
                                  model_def.shapes, is_leaf=lambda x: isinstance(x, NamedSharding))
        else:  # as `jaxllm.compression.checkpoint.load_workdir` places a compressed one: replicated
            tree, codes = _quantized_params(config, model_def, quantize)
            params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)
        graphdef, state = nnx.split(model_def.bind(params))  # as `jaxllm.generate.generate` splits its model

        def replicated_input(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

        key = jax.eval_shape(functools.partial(jax.random.key, 0))
        generate_lowering = lower_generate(
            graphdef, state, replicated_input((batch, width), jnp.int32), replicated_input((batch,), jnp.int32),
            replicated_input(key.shape, key.dtype), Sampling.of(max_new_tokens))
        shape = (cfg.layers, batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
        kv = NamedSharding(mesh, mesh_lib.logical_to_spec(CACHE_AXES, shape, mesh))
        cache = KVCache(jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.compute_dtype), sharding=kv),
                        jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.compute_dtype), sharding=kv),
                        replicated_input((batch,), jnp.int32), replicated_input((), jnp.int32))
        step_lowering = decode_step(graphdef).lower(state, replicated_input((batch, 1), jnp.int32), cache)
        generated, generate_figures = _compile(generate_lowering, target)
        _, step_figures = _compile(step_lowering, target)
    prefill_flops, step_flops = generation_flops(cfg, batch, width, cache_len)
    report = GenerateReport(
        target=str(target), devices=len(devices), mesh={"tensor": tensor}, quantize=quantize, batch=batch,
        prompt_len=width, max_new_tokens=max_new_tokens, cache_len=cache_len,
        parameters=memory.sharded_bytes(params), kv_cache=memory.sharded_bytes((cache.k, cache.v)),
        capacity=target.memory_bytes, generate=generate_figures, decode_step=step_figures,
        model_flops_prefill=prefill_flops, model_flops_step=step_flops)
    for figures in (generate_figures, step_figures):  # per device -> all devices, as for training
        if figures.compiled_flops is not None:
            figures.compiled_flops *= tensor
    if codes and generated is not None:
        found = hlo.products(generated.as_text())
        report.integer_products = sum(p.integer for p in found)
        report.float_products = sum(p.result in hlo.FLOATS and not p.integer for p in found)
        report.dequantized_products = len(hlo.dequantized_products(found, hlo.weight_views(codes, tensor)))
    return report


def describe_generation(report: GenerateReport) -> str:
    """The report as `python -m jaxllm.aot --step=generate` prints it."""
    weights = {"none": "f32 weights", "w8a8": "W8A8 (int8 weights, int8 token-wise activations)",
               "config": "weights compressed by the config's compression section"}[report.quantize]
    unit, size = ("GiB", GIB) if report.total >= GIB else ("MiB", 2**20)
    tensor = report.mesh["tensor"]
    lines = [f"target {report.target}: {report.devices} devices, {tensor} used (mesh tensor {tensor}); {weights}",
             f"generation: batch {report.batch}, prompt {report.prompt_len} tokens, {report.max_new_tokens} new "
             f"tokens, KV cache of {report.cache_len} slots ({report.kv_cache / size:.3f} {unit} per device)",
             f"per device, in {unit}: {'generate (prefill + decode loop)':>34}  {'one decode step':>16}"]
    programs = (report.generate, report.decode_step)
    for program in programs:
        if program.error:
            lines.append(f"the compiler refused a program: {program.error}")
    rows = [("arguments", lambda p: p.arguments), ("outputs", lambda p: p.outputs),
            ("  of them over donated arguments", lambda p: p.aliased), ("temporaries", lambda p: p.temporaries),
            ("total", lambda p: p.total)]
    for name, value in rows:
        lines.append(f"  {name:<34}{value(programs[0]) / size:>20.3f}  {value(programs[1]) / size:>16.3f}")
    lines.append(f"  (parameters {report.parameters / size:.3f} {unit}; the step's arguments also hold the KV cache)")
    lines.append(f"  peak {report.total / size:.3f} {unit} of {report.capacity / GIB:.2f} GiB "
                 f"({'fits, ' + format(report.headroom, '.0%') + ' headroom' if report.fits else 'does NOT fit'})")
    generate, step = report.generate.compiled_flops, report.decode_step.compiled_flops
    model_both = report.model_flops_prefill + report.model_flops_step
    if generate:
        lines.append(f"FLOPs, generate: model {model_both:.4g} for the prefill and one step, compiled {generate:.4g} "
                     f"({generate / model_both:.2f}x; XLA counts the decode loop's body once)")
    if step:
        lines.append(f"FLOPs, one decode step: model {report.model_flops_step:.4g}, compiled {step:.4g} "
                     f"({step / report.model_flops_step:.2f}x)")
    if report.integer_products is not None:
        lines.append(f"matrix products: {report.integer_products} int8 x int8 -> int32, {report.float_products} in "
                     f"floating point, {report.dequantized_products} on a dequantized weight")
    seconds = report.generate.compile_seconds + report.decode_step.compile_seconds
    lines.append(f"compiled in {seconds:.1f} s")
    if not report.fits:
        lines.append("to fit: fewer rows (--batch), a shorter cache (--max-new-tokens, --prompt-len), more tensor "
                     "parallelism (--tensor), or quantized weights (--quantize=w8a8)")
    return "\n".join(lines)
