"""LoRA as a parameter transform (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

DeepSpeed-Chat's `convert_linear_layer_to_lora` gives each selected linear layer `y = x W + (x A) B *
scaling` with `A = lora_right_weight [in, r]` drawn like PyTorch's default (Kaiming-uniform with
a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), `B = lora_left_weight [r, out]` zero, and
`scaling = lora_scaling / r`; the hybrid engine fuses `W + scaling * A B` before generation.

Here a LoRA model's parameters are `{"base": <params>, "lora": <factors>}`, where `lora` mirrors the
paths of the selected weights with `{"a": A, "b": B}`, and `merge` returns plain params with every
`W + scaling * A B` fused, which is what the forward pass, generation and the value head read. A
weight is selected when its path (keys joined by "/") contains `module_name` and it is a matrix of a
projection: jaxllm's projections keep their head structure (`wq [d, heads, head_dim]`,
`wo [heads, head_dim, d]`), so A and B keep it too (`wq`: A `[d, r]`, B `[r, heads, head_dim]`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.errors import UserError


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def input_dims(axes: tuple) -> int:
    """How many leading dimensions of a projection weight are its inputs: 1 when it reads the model
    dimension (`embed` first: wq, wk, wv, w_in, w_gate), else all but the last (wo, w_out)."""
    return 1 if axes[0] == "embed" else len(axes) - 1


def targets(logical_axes: Any, module_name: str) -> dict[tuple, tuple]:
    """{path: logical axes} of the weights LoRA adapts: projection matrices (two or more dimensions,
    one of them the model dimension `embed`; not the embedding tables, not the per-head biases) whose
    "/"-joined path contains `module_name`."""
    found = {}
    for path, axes in jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_axes)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        name = "/".join(map(str, keys))
        projection = len(axes) >= 2 and "embed" in axes and "vocab" not in axes and "positions" not in axes
        if projection and module_name in name:
            found[keys] = axes
    return found


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def lora_layout(logical_axes: Any, shapes: Any, module_name: str, dim: int) -> tuple[dict, dict]:
    """(logical axes, shapes) of the factor tree `{path: {"a", "b"}}` for rank `dim`."""
    found = targets(logical_axes, module_name)
    if not found:
        raise UserError(f"config key 'ppo.lora_module_name': {module_name!r} matches no weight matrix; "
                        "jaxllm paths look like 'blocks/0/attn/wq' (the default 'blocks' adapts every block)")
    axes_tree, shape_tree = {}, {}
    for path, axes in found.items():
        shape = _get(shapes, path)
        n_in = input_dims(axes)
        _set(axes_tree, path, {"a": tuple(axes[:n_in]) + (None,), "b": (None,) + tuple(axes[n_in:])})
        _set(shape_tree, path, {"a": tuple(shape[:n_in]) + (dim,), "b": (dim,) + tuple(shape[n_in:])})
    return axes_tree, shape_tree


def init_lora(base: Any, logical_axes: Any, module_name: str, dim: int, key: jax.Array) -> dict:
    """Factors for `base`: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, so `merge` starts at `base`."""
    factors: dict = {}
    for i, (path, axes) in enumerate(sorted(targets(logical_axes, module_name).items(), key=lambda kv: str(kv[0]))):
        weight = _get(base, path)
        n_in = input_dims(axes)
        fan_in = math.prod(weight.shape[:n_in])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), weight.shape[:n_in] + (dim,), jnp.float32, -bound, bound)
        b = jnp.zeros((dim,) + weight.shape[n_in:], jnp.float32)
        _set(factors, path, {"a": a, "b": b})
    return factors


def merge(params: dict, scaling: float) -> Any:
    """Plain params from `{"base", "lora"}`: each adapted weight becomes `W + scaling * A B`
    (A's last axis contracted with B's first)."""
    merged = jax.tree.map(lambda x: x, params["base"])

    def visit(node: Any, path: tuple) -> None:
        if isinstance(node, dict) and set(node) == {"a", "b"} and not isinstance(node["a"], dict):
            weight = _get(merged, path)
            delta = jnp.tensordot(node["a"], node["b"], axes=1)
            _set(merged, path, weight + scaling * delta.astype(weight.dtype))
            return
        for key, child in node.items():
            visit(child, path + (key,))

    visit(params["lora"], ())
    return merged
