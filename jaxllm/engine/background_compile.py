"""The train step's programs for a run whose batch shape changes, compiled ahead on a background thread.

A curriculum or random-LTD run changes the train step's shapes a few times (one program per distinct
rows x length x kept length), and each new shape would stop training for a compilation: seconds on a
CPU, much longer for a large model. The shapes are pure functions of the step
(`jaxllm.data_efficiency.DataEfficiency`), so all of them are known at the start. `BackgroundCompiledStep` lowers
and compiles them in order of first use on one background thread while the earlier programs train, and
the training loop takes each program when its first step comes (waiting only if it is not ready yet).

A batch whose shape was not planned falls back to the jitted step, which compiles it in the foreground.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

# (global rows, row length, kept length or None): what selects a program.
Signature = tuple[int, int, "int | None"]


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class BackgroundCompiledStep:
    """Called exactly as the jitted step: `(state, batch)`, or `(state, batch, kept)` with random-LTD's
    static kept length; every planned program is compiled ahead.

    `signatures`: the run's (rows, length, kept) in order of first use (kept None without random-LTD).
    Compilation starts on the first call, when the state's and the batch's dtypes and shardings are
    known; the first signature is compiled first, so that call waits only for its own program."""

    def __init__(self, jitted: Callable, signatures: Sequence[Signature], mesh: jax.sharding.Mesh | None = None):
        self._jitted = jitted
        self._with_kept = False  # set on the first call: whether the step takes the kept length
        self._signatures = list(dict.fromkeys(signatures))
        self._mesh = mesh
        self._programs: dict[Hashable, concurrent.futures.Future] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._unplanned: set[Signature] = set()
        self.compiled = 0  # programs compiled so far (ahead or in the foreground)

    def _compile(self, state_abstract, batch_abstract, kept):
        static = (kept,) if self._with_kept else ()
        # The mesh context is per thread.
        with contextlib.nullcontext() if self._mesh is None else jax.set_mesh(self._mesh):
            program = self._jitted.lower(state_abstract, batch_abstract, *static).compile()
        with self._lock:
            self.compiled += 1
        return program

    def _start(self, state, batch, with_kept: bool) -> None:
        self._with_kept = with_kept
        state_abstract = _abstract(state)
        template = _abstract(batch)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-compile")
        for rows, length, kept in self._signatures:
            self._programs[(rows, length, kept)] = self._pool.submit(
                self._compile, state_abstract, _reshaped(template, rows, length), kept)
        self._pool.shutdown(wait=False)  # runs what was submitted; the thread exits when done

    def __call__(self, state, batch, *kept):
        if self._pool is None:
            self._start(state, batch, bool(kept))
        signature = (*batch["inputs"].shape[:2], kept[0] if kept else None)
        future = self._programs.get(signature)
        if future is None:  # not planned: jit compiles it in the foreground, once
            if signature not in self._unplanned:
                self._unplanned.add(signature)
                with self._lock:
                    self.compiled += 1
            return self._jitted(state, batch, *kept)
        return future.result()(state, batch)  # a compiled program takes no static argument

    def close(self) -> None:
        """Drops programs not yet compiled (a run that stops early need not wait for them)."""
        for future in self._programs.values():
            future.cancel()


def _reshaped(template: Any, rows: int, length: int) -> Any:
    """The abstract batch `template` with `rows` rows of `length` tokens."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct((rows, length, *s.shape[2:]), s.dtype, sharding=s.sharding),
                        template)
