"""Where a train step's compile time goes: the loss and its gradient, and the optimizer update, each
compiled on its own for an abstract target (the same config, mesh, state layout and optimizer as
`python -m jaxllm.aot` compiles together).

    JAX_PLATFORMS=cpu python scripts/aot_compile_split.py --config=configs/llama_1b.yaml --target=tpu:v5e:2x2 \
        mesh.fsdp=4 train.batch_size=4 train.grad_accum=1 model.scan_layers=true    # and =false

Prints wall and process-CPU seconds for each part (CPU seconds move less when other jobs share the
machine; the compiler uses more than one thread, so they can exceed the wall time).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import mesh as mesh_lib  # noqa: E402
from jaxllm.aot import Target, abstract_batch  # noqa: E402
from jaxllm.pretraining import LanguageModelTraining  # noqa: E402


def timed_compile(fn, *args, **jit_kwargs) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = config_lib.load(args.config, args.overrides)
    target = Target.parse(args.target)
    mesh = mesh_lib.make_mesh(config.mesh, target.devices())
    with jax.set_mesh(mesh):
        task = LanguageModelTraining.build(config, mesh)
        layout, tx = task.layout, task.optimizer.tx
        params = layout.abstract["params"]
        batch = abstract_batch(config, mesh, config.train.batch_size // config.train.grad_accum, config.data.seq_len)

        def gradient(p, b):
            return jax.grad(lambda q: task.loss(q, b, None)[0])(p)

        def update(g, o, p):
            updates, o = tx.update(g, o, p)
            return optax.apply_updates(p, updates), o

        grads = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, layout.grads)
        parts = {"loss and gradient": timed_compile(gradient, params, batch, out_shardings=layout.grads),
                 "optimizer update": timed_compile(update, grads, layout.abstract["opt_state"], params)}
    leaves = len(jax.tree.leaves(params))
    print(f"{args.target}, scan_layers={config.model.scan_layers}, {leaves} parameter leaves")
    for name, (wall, cpu) in parts.items():
        print(f"  {name:18s} {wall:7.1f} s wall {cpu:7.1f} s CPU")


if __name__ == "__main__":
    main()
