"""Ulysses sequence parallelism: attention re-split from the length to the heads by all-to-alls.

With `mesh.sequence` > 1 the loss and gradients must equal one device's (f32), for learned positions
(GPT-2), RoPE with grouped-query heads (Llama) and ALiBi (BLOOM), on rows of two packed documents.
"""

import jax
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.errors import UserError
from jaxllm.losses import lm_loss_sums
from jaxllm.models.definition import ModelDef, init_params
from jaxllm.runtime import check_batch


def _cfg(family, overrides=()):
    return config_lib.load(None, [f"model.family={family}", "model.layers=2", "model.d_model=32", "model.heads=4",
                                  "model.vocab_size=128", "data.seq_len=16", "train.batch_size=4", *overrides])


def _batch(cfg):
    rng = np.random.default_rng(0)
    b, length = cfg.train.batch_size, cfg.data.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, (b, length + 1)).astype(np.int32)
    # Two documents per row whose positions restart at the boundary, which no sequence shard sits on,
    # and some padding: masks and positions must be the global ones inside every shard's attention.
    cut = length // 2 + 3
    seg = np.where(np.arange(length) < cut, 1, 2).astype(np.int32)[None].repeat(b, 0)
    seg[0, -3:] = 0
    pos = np.concatenate([np.arange(cut), np.arange(length - cut)]).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
            "positions": np.tile(pos, (b, 1)), "loss_mask": (seg != 0).astype(np.float32)}


def _loss_and_grads(cfg, devices):
    """Loss, gradients and compiled HLO text of one forward/backward on `devices` laid out by `cfg.mesh`."""
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    model = ModelDef.from_config(cfg.model)
    with jax.set_mesh(mesh):
        params = jax.device_put(init_params(cfg.model, cfg.seed),
                                mesh_lib.tree_shardings(mesh, model.logical_axes, model.shapes))
        batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in _batch(cfg).items()}
        compiled = jax.jit(jax.value_and_grad(lambda p, b: lm_loss_sums(model, p, b)[0])).lower(params, batch).compile()
        loss, grads = compiled(params, batch)
    return float(loss), jax.tree.map(np.asarray, grads), compiled.as_text()


@pytest.mark.parametrize("family, model, meshes", [
    ("gpt2", [], ["data=2 sequence=4"]),
    # 2 kv heads, repeated to split over 4 shards; and Ulysses inside tensor parallelism.
    ("llama", ["model.kv_heads=2"], ["data=2 sequence=4", "data=2 tensor=2 sequence=2"]),
    ("bloom", [], ["data=2 sequence=4"]),
], ids=["gpt2", "llama", "bloom"])
def test_sequence_parallel_matches_one_device(devices, family, model, meshes):
    ref_loss, ref_grads, _ = _loss_and_grads(_cfg(family, [*model, "mesh.data=1"]), devices[:1])
    # One scale for all leaves: some gradients (the key bias) are exactly zero up to rounding noise.
    scale = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
    for mesh in meshes:
        cfg = _cfg(family, [*model, *(f"mesh.{kv}" for kv in mesh.split())])
        check_batch(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
        loss, grads, hlo = _loss_and_grads(cfg, devices)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=mesh)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=mesh)
        # The sequence shards swap length for heads by all-to-all; without tensor parallelism (whose
        # vocab-split embedding table is gathered) nothing is all-gathered but the int32 positions/segments.
        assert "all-to-all" in hlo, mesh
        if "tensor" not in mesh:
            gathered = [line for line in hlo.splitlines() if " all-gather(" in line and " = s32[" not in line]
            assert not gathered, gathered


def test_heads_must_divide_over_the_sequence_axis(devices):
    cfg = _cfg("gpt2", ["mesh.data=1", "mesh.sequence=8"])
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    with pytest.raises(UserError, match=r"model.heads.*4 attention heads.*mesh.sequence=8"):
        check_batch(cfg, mesh)
    # The model itself refuses too (while tracing, before anything compiles) when used without the trainer.
    model = ModelDef.from_config(cfg.model)
    params = jax.eval_shape(lambda: init_params(cfg.model, 0))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(cfg))
    with jax.set_mesh(mesh), pytest.raises(UserError, match="mesh.sequence=8"):
        jax.eval_shape(lambda p, b: lm_loss_sums(model, p, b), params, batch)
