"""Every Pallas kernel, forward and backward, compiled by the real TPU (Mosaic) and GPU (Triton) compilers.

Each program is the public op with `implementation="auto"`, jitted under `jax.set_mesh` over a target's
abstract devices with the batch split over them (`scripts/aot_kernels.py` at the models' shapes; here
tiny ones). The checks: the compiled program holds the expected number of kernel custom calls (so
"auto" chose the kernel for the platform compiled for, and no part fell back to XLA), and the
compiler's per-device argument and output bytes are one device's share of the inputs and results (so
the kernel ran under `shard_map` on each device's rows instead of whole on every device). Lowered for
the local CPU, the same op is the XLA reference.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.aot import Target
from jaxllm.ops.token_dropped_attention import token_dropped_attention, token_dropped_attention_reference
from scripts import aot_kernels

pytestmark = pytest.mark.slow
TARGETS = ["tpu:v5e:2x2", "gpu:h100:1x4"]
PROGRAMS = [(kernel, i) for kernel, cases in aot_kernels.SMALL_SHAPES.items() for i in range(len(cases))]


def _needs(target: str) -> None:
    if target.startswith("tpu"):
        pytest.importorskip("libtpu", reason="the TPU compiler comes with the aot extra: pip install -e '.[aot]'")
    else:
        pytest.importorskip("jax_cuda12_plugin", reason="the GPU compiler: pip install -e '.[aot-gpu]'")


_meshes = {}


def _mesh(target: str):
    if target not in _meshes:
        _meshes[target] = aot_kernels.target_mesh(Target.parse(target))
    return _meshes[target]


def _device_bytes(tree) -> int:
    """Bytes of one device's shard of every array in `tree` (ShapeDtypeStructs with shardings)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("kernel,case", PROGRAMS, ids=[f"{k}-{i}".replace(" ", "_") for k, i in PROGRAMS])
@pytest.mark.parametrize("target", TARGETS)
def test_kernel_compiles_for_target(target, kernel, case, direction):
    _needs(target)
    mesh = _mesh(target)
    program = aot_kernels.BUILDERS[kernel](mesh, **aot_kernels.SMALL_SHAPES[kernel][case])
    compiled, _ = aot_kernels.compile_program(program, direction, mesh)

    platform = Target.parse(target).platform
    assert aot_kernels.kernel_calls(compiled, platform) == aot_kernels.CALLS[kernel][direction == "backward"]
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes == _device_bytes(program.args)
    if direction == "forward":  # the result, f32 or the input dtype, split over the devices like the batch
        out = jax.eval_shape(program.fn, *program.args)
        assert stats.output_size_in_bytes == out.size * out.dtype.itemsize // mesh.size
    else:  # one gradient per differentiated argument, sharded as that argument, plus, when there are
        # several, the output tuple's table of buffer pointers (8 bytes each on GPU, 512 aligned on TPU)
        grads = [program.args[i] for i in program.grad_argnums]
        table = stats.output_size_in_bytes - _device_bytes(grads)
        assert table == 0 if len(grads) == 1 else 8 * len(grads) <= table <= 512
    assert stats.temp_size_in_bytes >= 0


def test_auto_is_the_reference_when_compiled_for_cpu():
    # The same op and arguments, unsharded and lowered for this CPU: no kernel (neither compiled nor
    # interpreted, which would show as a loop over the grid), and the reference's values.
    rng = np.random.default_rng(0)
    b, r, h, d = 1, 32, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, r, h, d)), jnp.float32) for _ in range(3))
    ids = jnp.arange(r)[None]
    seg = jnp.ones((b, r), jnp.int32)
    lowered = jax.jit(lambda *a: token_dropped_attention(*a)).lower(q, k, v, seg, ids, ids)
    text = lowered.as_text()
    assert "tpu_custom_call" not in text and "triton" not in text and "while" not in text
    np.testing.assert_allclose(lowered.compile()(q, k, v, seg, ids, ids),
                               token_dropped_attention_reference(q, k, v, seg, ids, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_xla_implementation_compiles_without_the_kernel(target):
    _needs(target)
    mesh = _mesh(target)
    program = aot_kernels.token_dropped_program(mesh, **aot_kernels.SMALL_SHAPES["token-dropped attention"][0])
    xla = aot_kernels.Program(program.kernel, program.label,
                              lambda *a: token_dropped_attention(*a, compute_dtype=jnp.bfloat16, implementation="xla"),
                              program.args, program.grad_argnums)
    compiled, _ = aot_kernels.compile_program(xla, "forward", mesh)
    assert aot_kernels.kernel_calls(compiled, Target.parse(target).platform) == 0
