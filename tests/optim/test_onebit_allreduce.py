"""`compressed_allreduce` against a numpy simulation of W workers, bit packing, and the HLO traffic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxllm.engine.onebit import hlo_collectives
from jaxllm.optim import CompressionState, compressed_allreduce, init_compression_state
from jaxllm.optim.onebit_allreduce import compressed_allreduce_tree, pack_signs, padded_size, unpack_signs


def reference_allreduce(xs, worker, server):
    """DeepSpeed's algorithm written out for W simulated workers in float32 numpy.

    xs [W, n], worker [W, n_pad], server [W, n_pad / W] -> (output [n], worker', server').
    """
    xs, worker, server = (np.asarray(a, np.float32) for a in (xs, worker, server))
    w, n = xs.shape
    n_pad = worker.shape[1]
    chunk = n_pad // w
    buf = np.concatenate([xs, np.zeros((w, n_pad - n), np.float32)], axis=1) + worker
    scale = (np.linalg.norm(buf, axis=1) / np.sqrt(n_pad)).astype(np.float32)
    sign = np.where(buf >= 0, 1.0, -1.0).astype(np.float32)
    new_worker = buf - scale[:, None] * sign
    out = np.zeros(n_pad, np.float32)
    new_server = np.zeros_like(server)
    for j in range(w):  # worker j acts as the server of chunk j
        part = sign[:, j * chunk:(j + 1) * chunk]
        m = (part * (scale[:, None] / np.float32(w))).sum(0) + server[j]
        server_scale = np.float32(np.linalg.norm(m) / np.sqrt(chunk))
        server_sign = np.where(m >= 0, 1.0, -1.0).astype(np.float32)
        new_server[j] = m - server_scale * server_sign
        out[j * chunk:(j + 1) * chunk] = server_scale * server_sign
    return out[:n], new_worker, new_server


def run_sharded(mesh, xs, worker, server):
    def f(x, we, se):
        y, state = compressed_allreduce(x[0], CompressionState(we[0], se[0]), "d")
        return y[None], state.worker_error[None], state.server_error[None]

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(xs, worker, server)


@pytest.mark.parametrize("world, n", [(2, 1), (2, 100), (3, 37), (4, 1000), (8, 37), (8, 4096), (5, 333)])
def test_matches_numpy_simulation_over_rounds(devices, world, n):
    mesh = Mesh(np.asarray(devices[:world]), ("d",))
    state = init_compression_state(n, world)
    assert state.worker_error.shape == (padded_size(n, world),)
    worker = np.zeros((world, *state.worker_error.shape), np.float32)
    server = np.zeros((world, *state.server_error.shape), np.float32)
    ref_worker, ref_server = worker.copy(), server.copy()
    rng = np.random.default_rng(world * 1000 + n)
    for _ in range(4):  # several rounds: the error buffers feed back
        # DeepSpeed's test input: uniform noise shifted by 0.01 * rank, so scales differ per worker.
        xs = (rng.random((world, n)) - 0.5 + 0.01 * np.arange(world)[:, None]).astype(np.float32)
        y, worker, server = run_sharded(mesh, xs, worker, server)
        want, ref_worker, ref_server = reference_allreduce(xs, ref_worker, ref_server)
        y = np.asarray(y)
        for rank in range(world):  # every device gets the same average
            np.testing.assert_array_equal(y[rank], y[0])
        np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(worker, ref_worker, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(server, ref_server, rtol=1e-5, atol=1e-6)
        # The output is a 1-bit code: one magnitude per server chunk.
        chunk = padded_size(n, world) // world
        for j in range(world):
            assert len(np.unique(np.abs(y[0][j * chunk:(j + 1) * chunk]))) <= 1


def test_error_feedback_makes_the_running_average_exact(devices):
    """Summed over rounds, the outputs track the summed true averages: the bias stays bounded."""
    world, n = 4, 256
    mesh = Mesh(np.asarray(devices[:world]), ("d",))
    state = init_compression_state(n, world)
    worker = np.zeros((world, *state.worker_error.shape), np.float32)
    server = np.zeros((world, *state.server_error.shape), np.float32)
    xs = np.random.default_rng(0).normal(size=(world, n)).astype(np.float32)
    total = np.zeros(n)
    rounds = 200
    for _ in range(rounds):
        y, worker, server = run_sharded(mesh, xs, worker, server)
        total += np.asarray(y[0])
    one_round_error = np.abs(reference_allreduce(xs, 0 * worker, 0 * server)[0] - xs.mean(0)).mean()
    drift = np.abs(total / rounds - xs.mean(0)).mean()
    assert drift < one_round_error / 20, (drift, one_round_error)


def test_single_worker_without_axis_matches_simulation():
    x = np.linspace(-1, 1, 50, dtype=np.float32) ** 3
    state = init_compression_state(50, 1)
    y, new = compressed_allreduce(jnp.asarray(x), state, None)
    want, ref_worker, ref_server = reference_allreduce(x[None], np.zeros((1, 56)), np.zeros((1, 56)))
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(new.worker_error, ref_worker[0], rtol=1e-5, atol=1e-7)


def test_tree_version_equals_separate_calls(devices):
    world = 4
    mesh = Mesh(np.asarray(devices[:world]), ("d",))
    sizes = [5, 64, 130]
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(world, n)).astype(np.float32) for n in sizes]
    states = [init_compression_state(n, world) for n in sizes]
    stacked = [CompressionState(jnp.zeros((world, *s.worker_error.shape)), jnp.zeros((world, *s.server_error.shape)))
               for s in states]

    def fused(xs, states):
        ys, new = compressed_allreduce_tree([x[0] for x in xs], [jax.tree.map(lambda a: a[0], s) for s in states],
                                            "d")
        return [y[None] for y in ys], [jax.tree.map(lambda a: a[None], s) for s in new]

    def separate(xs, states):
        out = [compressed_allreduce(x[0], jax.tree.map(lambda a: a[0], s), "d")
               for x, s in zip(xs, states, strict=True)]
        return [y[None] for y, _ in out], [jax.tree.map(lambda a: a[None], s) for _, s in out]

    run = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(xs, stacked)  # noqa: E731
    for a, b in zip(jax.tree.leaves(run(fused)), jax.tree.leaves(run(separate)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pack_signs_is_numpy_packbits_msb_first():
    bits = np.random.default_rng(2).random((3, 64)) > 0.5
    packed = pack_signs(jnp.asarray(bits))
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(packed, np.packbits(bits, axis=-1))
    np.testing.assert_array_equal(unpack_signs(packed), np.where(bits, 1.0, -1.0))
    # Zero counts as positive, as in DeepSpeed (sign(0) + 1 -> True).
    np.testing.assert_array_equal(pack_signs(jnp.zeros(8) >= 0), [255])


def test_padding_rule_is_deepspeeds():
    # multiple of W * lcm(W, 8): W=2 -> 16, W=3 -> 72, W=8 -> 64, W=12 -> 288
    assert [padded_size(1, w) for w in (1, 2, 3, 8, 12)] == [8, 16, 72, 64, 288]
    assert padded_size(64, 8) == 64 and padded_size(65, 8) == 128
    state = init_compression_state(100, 3)
    assert state.worker_error.shape == (144,) and state.server_error.shape == (48,)


def test_only_packed_bits_and_scalars_cross_devices(devices):
    world, n = 8, 10_000
    mesh = Mesh(np.asarray(devices), ("d",))
    state = init_compression_state(n, world)
    args = (jnp.zeros((world, n)), jnp.zeros((world, *state.worker_error.shape)),
            jnp.zeros((world, *state.server_error.shape)))

    def f(x, we, se):
        y, s = compressed_allreduce(x[0], CompressionState(we[0], se[0]), "d")
        return y[None], s.worker_error[None], s.server_error[None]

    text = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("d"), out_specs=P("d"))).lower(*args).compile().as_text()
    found = sorted((c.kind, c.dtypes, c.elements) for c in hlo_collectives(text))
    n_pad = padded_size(n, world)
    assert found == [("all-gather", ("f32",), world), ("all-gather", ("f32",), world),
                     ("all-gather", ("u8",), n_pad // 8), ("all-to-all", ("u8",), n_pad // 8)], found
