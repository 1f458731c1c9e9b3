"""One decoder-only transformer for three families, read top to bottom in the order data flows.

Family switches (from `ModelConfig.family`):

| family | positions        | norm      | MLP             | biases | embedding norm | head  |
|--------|------------------|-----------|-----------------|--------|----------------|-------|
| gpt2   | learned absolute | LayerNorm | GELU (tanh)     | yes    | no             | tied  |
| llama  | rotary (RoPE)    | RMSNorm   | SwiGLU          | no     | no             | own   |
| bloom  | ALiBi            | LayerNorm | GELU (tanh)     | yes    | LayerNorm      | tied  |

Parameters are f32 master weights tagged with logical axis names (`jaxllm.mesh.LOGICAL_RULES` maps
them to the mesh); matmuls run in `compute_dtype` with f32 accumulation; softmax and logits are f32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm.config import ModelConfig
from jaxllm.mesh import constrain
from jaxllm.ops.attention import alibi_slopes, causal_attention
from jaxllm.ops.matmul import matmul


def _param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (or ones when std is None) carrying logical axis names."""
    value = jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, logical_axes=axes)


def _zeros(shape, axes) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class Norm(nnx.Module):
    """LayerNorm (with bias) or RMSNorm, computed in f32."""

    def __init__(self, dim: int, rms: bool, eps: float, rngs: nnx.Rngs):
        self.rms, self.eps = rms, eps
        self.scale = _param(rngs, (dim,), ("norm",), None)
        self.bias = None if rms else _zeros((dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.rms:
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * self.scale[...]
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE with the half-split pairing (dimension i rotates with i + d/2), as Llama checkpoints use."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [b, l, half]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.d_model, cfg.heads, cfg.num_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.layers)  # GPT-2's scaled residual init
        self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wv = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std)
        biased = cfg.family != "llama"
        self.bq = _zeros((h, hd), ("heads", "head_dim")) if biased else None
        self.bk = _zeros((kv, hd), ("kv_heads", "head_dim")) if biased else None
        self.bv = _zeros((kv, hd), ("kv_heads", "head_dim")) if biased else None
        self.bo = _zeros((d,), ("embed",)) if biased else None

    def _project(self, x, w, b):
        d, heads, hd = w.shape
        y = matmul(x, w[...].reshape(d, heads * hd), self.cfg.compute_dtype).reshape(*x.shape[:-1], heads, hd)
        return y if b is None else y + b[...]

    def __call__(self, x, positions, segment_ids, alibi):
        cfg = self.cfg
        q = self._project(x, self.wq, self.bq)
        k = self._project(x, self.wk, self.bk)
        v = self._project(x, self.wv, self.bv)
        if cfg.family == "llama":
            q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        q = constrain(q, ("batch", "length", "heads", None))
        out = causal_attention(q, k, v, segment_ids, positions, alibi, cfg.compute_dtype)
        batch, length, heads, hd = out.shape
        y = matmul(out.reshape(batch, length, heads * hd), self.wo[...].reshape(heads * hd, -1), cfg.compute_dtype)
        return y if self.bo is None else y + self.bo[...]


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.ffn_dim
        self.w_in = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std) if cfg.family == "llama" else None
        self.w_out = _param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.layers))
        biased = cfg.family != "llama"
        self.b_in = _zeros((f,), ("mlp",)) if biased else None
        self.b_out = _zeros((d,), ("embed",)) if biased else None

    def __call__(self, x):
        dtype = self.cfg.compute_dtype
        h = matmul(x, self.w_in[...], dtype)
        if self.w_gate is not None:
            h = jax.nn.silu(matmul(x, self.w_gate[...], dtype)) * h
        else:
            h = jax.nn.gelu(h + self.b_in[...], approximate=True)
        h = constrain(h, ("batch", "length", "mlp"))
        y = matmul(h, self.w_out[...], dtype)
        return y if self.b_out is None else y + self.b_out[...]


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        rms = cfg.family == "llama"
        self.attn_norm = Norm(cfg.d_model, rms, cfg.norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, rms, cfg.norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids, alibi):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, alibi)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", None))


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block; recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Token ids `[batch, length]` -> next-token logits `[batch, length, vocab]` (f32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.pos_embed = (
            _param(rngs, (cfg.max_len, cfg.d_model), ("positions", "embed"), cfg.init_std / 2)
            if cfg.family == "gpt2" else None
        )
        self.embed_norm = Norm(cfg.d_model, False, cfg.norm_eps, rngs) if cfg.family == "bloom" else None
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.final_norm = Norm(cfg.d_model, cfg.family == "llama", cfg.norm_eps, rngs)
        self.head = None if cfg.tied else _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                                 cfg.init_std)

    def __call__(
        self,
        tokens: Int[Array, "b l"],
        positions: Int[Array, "b l"] | None = None,
        segment_ids: Int[Array, "b l"] | None = None,
    ) -> Float[Array, "b l vocab"]:
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        # Gather rows from a whole table: a gather from a vocab-sharded table cannot be partitioned
        # efficiently, while all-gathering the table is what FSDP does for every weight anyway.
        x = jnp.take(constrain(self.embed[...], (None, None)), tokens, axis=0)
        if self.pos_embed is not None:
            x = x + jnp.take(constrain(self.pos_embed[...], (None, None)), positions, axis=0)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = constrain(x, ("batch", "length", None))
        alibi = alibi_slopes(cfg.heads) if cfg.family == "bloom" else None
        for block in self.blocks:
            if cfg.remat == "none":
                x = block(x, positions, segment_ids, alibi)
            else:
                run = nnx.remat(lambda blk, *args: blk(*args), policy=_REMAT_POLICIES[cfg.remat])
                x = run(block, x, positions, segment_ids, alibi)
        x = self.final_norm(x)
        if self.head is None:  # tied: contract with the embedding table's model axis
            return matmul(x, self.embed[...], cfg.compute_dtype, transpose_w=True)
        return matmul(x, self.head[...], cfg.compute_dtype)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by role, from the abstract model (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(state))
    embedding = cfg.vocab_size * cfg.d_model + (cfg.max_len * cfg.d_model if cfg.family == "gpt2" else 0)
    unembedding = cfg.vocab_size * cfg.d_model  # the head's matmul, tied or not
    head = 0 if cfg.tied else unembedding
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding - head,
            "unembedding": unembedding}
