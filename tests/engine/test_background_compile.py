"""`jaxllm.engine.background_compile.BackgroundCompiledStep`: planned programs compiled ahead give the jitted
step's results."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.engine.background_compile import BackgroundCompiledStep


def _step(state, batch, kept=None):
    x = batch["inputs"].astype(jnp.float32)
    if kept is not None:
        x = x[:, :kept]
    return state + 1, {"loss": jnp.sum(x) * state}


def _batch(rows, length, offset=0):
    return {"inputs": jnp.arange(rows * length, dtype=jnp.int32).reshape(rows, length) + offset}


def test_planned_programs_match_the_jitted_step_and_unplanned_shapes_fall_back():
    jitted = jax.jit(_step, static_argnums=2)
    reference = jax.jit(_step, static_argnums=2)
    plan = [(4, 8, 4), (4, 8, 4), (4, 16, 8), (4, 16, None)]
    programs = BackgroundCompiledStep(jitted, plan)
    state = ref_state = jnp.float32(2.0)
    for i, (rows, length, kept) in enumerate(plan):
        state, metrics = programs(state, _batch(rows, length, i), kept)
        ref_state, ref_metrics = reference(ref_state, _batch(rows, length, i), kept)
        np.testing.assert_array_equal(metrics["loss"], ref_metrics["loss"])
        np.testing.assert_array_equal(state, ref_state)
    assert programs.compiled == 3  # one per distinct signature

    # A shape outside the plan still runs, through jit, and is counted.
    state, metrics = programs(state, _batch(2, 8), 4)
    ref_state, ref_metrics = reference(ref_state, _batch(2, 8), 4)
    np.testing.assert_array_equal(metrics["loss"], ref_metrics["loss"])
    assert programs.compiled == 4
    programs.close()


def test_a_step_without_a_kept_length_is_called_with_two_arguments():
    jitted = jax.jit(lambda state, batch: _step(state, batch))
    programs = BackgroundCompiledStep(jitted, [(2, 4, None), (2, 8, None)])
    state, metrics = programs(jnp.float32(1.0), _batch(2, 4))
    state, metrics = programs(state, _batch(2, 8))
    assert float(metrics["loss"]) == float(np.arange(16).sum() * 2.0)
    assert programs.compiled == 2
