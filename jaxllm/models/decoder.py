"""One decoder-only transformer for three families, read top to bottom in the order data flows.

Family switches (from `ModelConfig.family`):

| family | positions        | norm      | MLP             | biases | embedding norm | head  |
|--------|------------------|-----------|-----------------|--------|----------------|-------|
| gpt2   | learned absolute | LayerNorm | GELU (tanh)     | yes    | no             | tied  |
| llama  | rotary (RoPE)    | RMSNorm   | SwiGLU          | no     | no             | own   |
| bloom  | ALiBi            | LayerNorm | GELU (tanh)     | yes    | LayerNorm      | tied  |

Parameters are f32 master weights tagged with logical axis names (`jaxllm.mesh.LOGICAL_RULES` maps
them to the mesh); matmuls run in `compute_dtype` with f32 accumulation; softmax and logits are f32.
Every projection and the token-embedding lookup go through `jaxllm.ops.linear`, which is
`jaxllm.ops.matmul.matmul` (and a plain gather) for ordinary arrays and defers to any weight object
bound in place of a parameter (`jaxllm.ops.linear.Weight`), such as the compressed weights of
`jaxllm.compression` (fake-quantized or integer codes); the model itself knows nothing of them.

Two entry points share the weights: `Decoder.__call__` runs whole (packed) sequences for training, and
`Decoder.decode` runs a few new tokens per row against a `KVCache` of the keys and values computed so
far, which is what generation (`jaxllm.generate`) steps with.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxllm import mesh as mesh_lib
from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.ltd import LTDPlan, dropped_layer
from jaxllm.mesh import constrain
from jaxllm.models.pipeline import pipelined_blocks
from jaxllm.models.stacking import BlockSlots
from jaxllm.ops.attention import alibi_slopes, causal_attention
from jaxllm.ops.barrier import gradient_barrier
from jaxllm.ops.linear import embedding_lookup, linear
from jaxllm.ops.token_dropped_attention import token_dropped_attention


def init_param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (or ones when std is None) carrying logical axis names."""
    value = jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, logical_axes=axes)


def zeros_param(shape, axes) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class Norm(nnx.Module):
    """LayerNorm (with bias) or RMSNorm, computed in f32."""

    def __init__(self, dim: int, rms: bool, eps: float, rngs: nnx.Rngs):
        self.rms, self.eps = rms, eps
        self.scale = init_param(rngs, (dim,), ("norm",), None)
        self.bias = None if rms else zeros_param((dim,), ("norm",))

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


CACHE_AXES = (None, "batch", "kv_heads", None, "head_dim")  # logical axes of KVCache.k and KVCache.v


class KVCache(NamedTuple):
    """Keys and values of every layer for `length` slots per row, for left-padded rows.

    Row `b` holds padding in slots `[0, start[b])` and real tokens from `start[b]` on, so the token in
    slot `s` has position `s - start[b]`. Slots `[0, index)` are filled; `Decoder.decode` writes the
    next tokens at `index` and advances it. Keys are stored after rotary embedding (Llama), in the
    model's compute dtype, with `kv_heads` heads (grouped-query attention caches only those).

    Layout `[layers, batch, kv_heads, length, head_dim]`: each head's slots are contiguous, as the
    attention dots read them without a transpose (on CPU, 2.3x faster cached attention per layer
    than slot-major `[..., length, kv_heads, head_dim]`).
    """

    k: Float[Array, "layers b kv_heads length head_dim"]
    v: Float[Array, "layers b kv_heads length head_dim"]
    start: Int[Array, " b"]
    index: Int[Array, ""]

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, start: Int[Array, " b"] | None = None) -> KVCache:
        """An empty cache of `length` slots; `start` (default 0) is each row's first real slot.

        Under a mesh (`jax.set_mesh`) the cache is sharded like activations over the batch and like
        the key/value projections over `kv_heads` (when the tensor axis divides them).
        """
        shape = (cfg.layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        k, v = (constrain(jnp.zeros(shape, cfg.compute_dtype), CACHE_AXES) for _ in range(2))
        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        # The barrier keeps XLA from constant-folding a prefill's (fully masked) attention over the
        # empty cache, which takes seconds of compile time for nothing.
        return cls(*jax.lax.optimization_barrier((k, v, start, jnp.zeros((), jnp.int32))))


def cached_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b kv s d"],
    v: Float[Array, "b kv s d"],
    index: Int[Array, ""],
    start: Int[Array, " b"],
    alibi: Float[Array, " h"] | None = None,
    compute_dtype=jnp.float32,
) -> Float[Array, "b t h d"]:
    """Attention of `t` queries in slots `index .. index + t - 1` over a cache of `s` slots.

    Query slot i sees key slot j when `start[b] <= j <= i`: causal, and blind to left padding and to
    slots not written yet. Otherwise the same computation as `causal_attention_reference`:
    softmax(q k^T / sqrt(d) + alibi * (j - i)) v with the softmax in f32 and grouped heads (query head
    h reads key head h // (h_q / h_kv)). Within a row, slot distance equals position distance, so
    ALiBi sees the right relative distances. A padding query sees no key and gets a uniform average.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q_slot = index + jnp.arange(length)
    k_slot = jnp.arange(slots)
    visible = (k_slot[None, None, :] <= q_slot[None, :, None]) & (k_slot[None, None, :] >= start[:, None, None])
    # Both dots are plain batched matmuls over (batch, kv head), rows m = (group, query); this form
    # also runs with bf16 inputs on XLA's CPU backend, which rejects some other orders of the same dot.
    qg = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, kv_heads, groups * length, head_dim).astype(compute_dtype)
    scores = jnp.einsum(
        "bkmd,bksd->bkms", qg, k.astype(compute_dtype), preferred_element_type=jnp.float32
    ) / jnp.sqrt(jnp.float32(head_dim))
    scores = scores.reshape(batch, heads, length, slots)
    if alibi is not None:
        distance = (k_slot[None, :] - q_slot[:, None]).astype(jnp.float32)  # pos_k - pos_q
        scores = scores + alibi[None, :, None, None] * distance[None, None]
    scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(compute_dtype)
    probs = probs.reshape(batch, kv_heads, groups * length, slots)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v.astype(compute_dtype), preferred_element_type=jnp.float32)
    out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, head_dim)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.d_model, cfg.heads, cfg.num_kv_heads, cfg.head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.layers)  # GPT-2's scaled residual init
        self.wq = init_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std)
        self.wk = init_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wv = init_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.wo = init_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std)
        biased = cfg.family != "llama"
        self.bq = zeros_param((h, hd), ("heads", "head_dim")) if biased else None
        self.bk = zeros_param((kv, hd), ("kv_heads", "head_dim")) if biased else None
        self.bv = zeros_param((kv, hd), ("kv_heads", "head_dim")) if biased else None
        self.bo = zeros_param((d,), ("embed",)) if biased else None

    def _project(self, x, w, b):
        y = linear(x, w[...], self.cfg.compute_dtype)  # [d, heads, head_dim] -> [..., heads, head_dim]
        return y if b is None else y + b[...]

    def _qkv(self, x, positions):
        """Queries, keys and values of `x` (`[b, l, heads, head_dim]`), rotated for Llama."""
        q = self._project(x, self.wq, self.bq)
        k = self._project(x, self.wk, self.bk)
        v = self._project(x, self.wv, self.bv)
        if self.cfg.family == "llama":
            q, k = rotary(q, positions, self.cfg.rope_theta), rotary(k, positions, self.cfg.rope_theta)
        return q, k, v

    def __call__(self, x, positions, segment_ids, alibi, kept_index=None, implementation="auto", attention=None):
        """`kept_index` (`[b, r]`, ascending): `x` holds only these tokens of each row (random-LTD);
        the causal mask follows their original indices and RoPE/ALiBi their `positions`. `attention`
        replaces `causal_attention` (same arguments), e.g. `jaxllm.multimodal.mmca_override`."""
        cfg = self.cfg
        q, k, v = self._qkv(x, positions)
        # Projections stay split over the length: without these, XLA gathers the whole input for them
        # instead of moving the (smaller per device) projected heads in all-to-alls.
        q = constrain(q, ("batch", "length", "heads", None))
        k, v = (constrain(t, ("batch", "length", "kv_heads", None)) for t in (k, v))
        q, k, v, segment_ids, positions = self._ulysses(q, k, v, segment_ids, positions)
        if kept_index is not None:
            kept_index = constrain(kept_index, ("batch", "attn_length"))
            out = token_dropped_attention(q, k, v, segment_ids, positions, kept_index, alibi, cfg.compute_dtype,
                                          implementation)
        elif attention is not None:
            out = attention(q, k, v, segment_ids, positions, alibi, cfg.compute_dtype)
        else:
            out = causal_attention(q, k, v, segment_ids, positions, alibi, cfg.compute_dtype,
                                   cfg.attention_implementation)
        # Pinned in the heads layout first, so the move back is one all-to-all after attention.
        out = constrain(out, ("batch", "attn_length", "attn_heads", None))
        return self._output(constrain(out, ("batch", "length", "heads", None)))

    def _ulysses(self, q, k, v, segment_ids, positions):
        """Ulysses sequence parallelism: with `mesh.sequence` > 1, activations arrive split over the length;
        these constraints re-split q, k and v over heads (tensor x sequence) with whole rows, which XLA
        does with one all-to-all each (and the caller's constraint on the output with one more back).
        Masks and ALiBi then see whole rows; RoPE already ran on each token's global position. Without a
        sequence axis these are the usual tensor-parallel layouts. `docs/sequence_parallel.md`.

        Key/value heads that the attention shards do not divide (grouped-query attention with fewer
        kv heads than shards) are repeated to the smallest count they do divide, so that each device
        holds the key/value heads its query heads read; that repeat is exact and costs only traffic.
        """
        mesh_lib.check_attention_heads(self.cfg.heads)
        shards = mesh_lib.shard_count("attn_kv_heads")
        kv = k.shape[2]
        if kv % shards and self.cfg.heads % shards == 0:
            repeat = shards // math.gcd(kv, shards)  # divides heads / kv, so grouping stays aligned
            # Repeated while still split over the length, so the copies travel in the all-to-all
            # (1 / shards of the key/values each) rather than as an all-gather of every kv head.
            k, v = (constrain(jnp.repeat(t, repeat, axis=2), ("batch", "length", "kv_heads", None)) for t in (k, v))
        q = constrain(q, ("batch", "attn_length", "attn_heads", None))
        k, v = (constrain(t, ("batch", "attn_length", "attn_kv_heads", None)) for t in (k, v))
        segment_ids, positions = (constrain(t, ("batch", "attn_length")) for t in (segment_ids, positions))
        return q, k, v, segment_ids, positions

    def _output(self, out):
        batch, length, heads, hd = out.shape
        y = linear(out.reshape(batch, length, heads * hd), self.wo[...], self.cfg.compute_dtype, contract=2)
        return y if self.bo is None else y + self.bo[...]

    def decode(self, x, positions, layer: int, cache: KVCache, alibi, attention=None):
        """Attention of new tokens `x` over the cache, after writing their keys/values into layer `layer`.
        `attention` replaces `cached_attention` (same arguments).

        Each layer updates the cache in place (`dynamic_update_slice` whose operand has no other
        reader), which XLA keeps copy-free inside a decode loop.
        """
        cfg = self.cfg
        q, k, v = self._qkv(x, positions)
        q = constrain(q, ("batch", None, "heads", None))
        where = (layer, 0, 0, cache.index, 0)

        def write(all_layers, new):  # new: [b, t, kv, d] -> slots index .. index + t - 1 of this layer
            new = jnp.swapaxes(new, 1, 2).astype(all_layers.dtype)[None]
            return constrain(jax.lax.dynamic_update_slice(all_layers, new, where), CACHE_AXES)

        k_all, v_all = write(cache.k, k), write(cache.v, v)
        out = (attention or cached_attention)(q, k_all[layer], v_all[layer], cache.index, cache.start, alibi,
                                              cfg.compute_dtype)
        return self._output(out), cache._replace(k=k_all, v=v_all)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.ffn_dim
        self.w_in = init_param(rngs, (d, f), ("embed", "mlp"), cfg.init_std)
        self.w_gate = init_param(rngs, (d, f), ("embed", "mlp"), cfg.init_std) if cfg.family == "llama" else None
        self.w_out = init_param(rngs, (f, d), ("mlp", "embed"), cfg.init_std / math.sqrt(2 * cfg.layers))
        biased = cfg.family != "llama"
        self.b_in = zeros_param((f,), ("mlp",)) if biased else None
        self.b_out = zeros_param((d,), ("embed",)) if biased else None

    def __call__(self, x):
        dtype = self.cfg.compute_dtype
        h = linear(x, self.w_in[...], dtype)
        if self.w_gate is not None:
            h = jax.nn.silu(linear(x, self.w_gate[...], dtype)) * h
        else:
            h = jax.nn.gelu(h + self.b_in[...], approximate=self.cfg.activation == "gelu_tanh")
        h = constrain(h, ("batch", "length", "mlp"))
        y = linear(h, self.w_out[...], dtype)
        return y if self.b_out is None else y + self.b_out[...]


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        rms = cfg.family == "llama"
        self.attn_norm = Norm(cfg.d_model, rms, cfg.norm_eps, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, rms, cfg.norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids, alibi, kept_index=None, implementation="auto", attention=None):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, alibi, kept_index, implementation, attention)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", None))

    def decode(self, x, positions, layer: int, cache: KVCache, alibi, attention=None):
        y, cache = self.attn.decode(self.attn_norm(x), positions, layer, cache, alibi, attention)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", None, None)), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block; recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Token ids `[batch, length]` -> next-token logits `[batch, length, vocab]` (f32).

    `slots` holds the blocks' weights stacked in that layout (`jaxllm.models.stacking`; what the
    engine trains with scanned layers or pipeline stages) instead of one module per block; the
    initial values are the same either way."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, slots: BlockSlots | None = None):
        self.cfg = cfg
        self.slots = slots
        self.embed = init_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.pos_embed = (
            init_param(rngs, (cfg.max_len, cfg.d_model), ("positions", "embed"), cfg.init_std / 2)
            if cfg.family == "gpt2" else None
        )
        self.embed_norm = Norm(cfg.d_model, False, cfg.norm_eps, rngs) if cfg.family == "bloom" else None
        blocks = [Block(cfg, rngs) for _ in range(cfg.layers)]
        self.blocks = nnx.List(blocks) if slots is None else _stacked_module(blocks, slots)
        self.final_norm = Norm(cfg.d_model, cfg.family == "llama", cfg.norm_eps, rngs)
        self.head = None if cfg.tied else init_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                                 cfg.init_std)

    def __call__(
        self,
        tokens: Int[Array, "b l"] | None,
        positions: Int[Array, "b l"] | None = None,
        segment_ids: Int[Array, "b l"] | None = None,
        ltd: LTDPlan | None = None,
        *,
        embeddings: Float[Array, "b l d"] | None = None,
        attention=None,
    ) -> Float[Array, "b l vocab"]:
        """Logits of whole rows. `ltd` (training only) makes its layers run on kept tokens (`jaxllm.ltd`).

        Hooks for models built around the decoder (`jaxllm.multimodal`): `embeddings` replaces the
        token-embedding lookup (positions and BLOOM's embedding norm still apply; `tokens` may be None),
        and `attention` replaces `causal_attention` in every block (same arguments).
        """
        cfg = self.cfg
        shape = tokens.shape if embeddings is None else embeddings.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
        if segment_ids is None:
            segment_ids = jnp.ones(shape, jnp.int32)
        if ltd is not None and attention is not None:
            raise ValueError("random-LTD layers run their own attention; an attention override cannot be combined")
        x = constrain(self._embed(tokens, positions, embeddings), ("batch", "length", None))
        alibi = alibi_slopes(cfg.heads) if cfg.family == "bloom" else None
        pipeline = mesh_lib.pipeline_settings()
        if pipeline.stages > 1:
            self._check_pipelined(ltd)
            slots = BlockSlots.of(cfg.layers, pipeline)
            graphdef, stacked = self._stacked(slots)
            # The pipeline applies the remat policy itself, around the cutting of each slot's weights.
            policy = (jax.checkpoint_policies.everything_saveable if cfg.remat == "none"
                      else _REMAT_POLICIES[cfg.remat])
            return self._logits(pipelined_blocks(self._block_fn(graphdef, attention, remat=False), stacked, x,
                                                 positions, segment_ids, pipeline, slots.active, policy))
        if (cfg.scan_layers or self.slots is not None) and ltd is None and self._stackable():
            return self._logits(self._scanned_blocks(x, positions, segment_ids, attention))
        for layer in range(cfg.layers):
            block = self.block(layer)
            x = gradient_barrier(x)  # one materialised residual gradient per layer (see jaxllm.ops.barrier)
            kept = None if ltd is None else ltd.kept(layer)
            if kept is not None:
                x = dropped_layer(self._kept_tokens_block(block, alibi, ltd.implementation), x, positions,
                                  segment_ids, kept)
            elif cfg.remat == "none":
                x = block(x, positions, segment_ids, alibi, attention=attention)
            else:
                run = nnx.remat(lambda blk, *args: blk(*args, attention=attention), policy=_REMAT_POLICIES[cfg.remat])
                x = run(block, x, positions, segment_ids, alibi)
        return self._logits(x)

    def decode(
        self, tokens: Int[Array, "b t"] | None, cache: KVCache, *, last_only: bool = False,
        embeddings: Float[Array, "b t d"] | None = None, attention=None,
    ) -> tuple[Float[Array, "b t vocab"], KVCache]:
        """Logits of `t` new tokens per row given the cached ones, and the cache with them added.

        The tokens go into slots `cache.index .. cache.index + t - 1` at positions `slot - cache.start`
        (so a left-padded prompt's first real token has position 0). A prompt is prefilled with one
        call on the whole left-padded batch, then generation feeds one token at a time; the logits
        equal those of `__call__` on the unpadded sequences. `last_only` returns the last slot's
        logits alone (`t` = 1 in the result), all that sampling needs after a prefill. `embeddings` and
        `attention` are the hooks of `__call__` (`attention` replaces `cached_attention`).
        """
        cfg = self.cfg
        new = tokens.shape[1] if embeddings is None else embeddings.shape[1]
        slots = cache.index + jnp.arange(new, dtype=jnp.int32)
        positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)  # padding slots read position 0
        x = constrain(self._embed(tokens, positions, embeddings), ("batch", None, None))
        alibi = alibi_slopes(cfg.heads) if cfg.family == "bloom" else None
        for layer in range(cfg.layers):
            x, cache = self.block(layer).decode(x, positions, layer, cache, alibi, attention)
        if last_only:
            x = x[:, -1:]
        return self._logits(x), cache._replace(index=cache.index + new)

    def block(self, layer: int) -> Block:
        """Block `layer` as a module (cut from the stacked weights when the blocks are stacked)."""
        if self.slots is None:
            return self.blocks[layer]
        j = self.slots.position(layer)
        return nnx.merge(nnx.graphdef(self.blocks), jax.tree.map(lambda w: w[j], nnx.state(self.blocks)))

    def _stackable(self) -> bool:
        """Whether every block has the same weight tree (compressed weights may differ per block)."""
        if self.slots is not None:
            return True
        first = jax.tree.structure(nnx.state(self.blocks[0]))
        return all(jax.tree.structure(nnx.state(b)) == first for b in self.blocks[1:])

    def _stacked(self, slots: BlockSlots):
        """The blocks' shared graph and their weights stacked in layout `slots`: as held when the blocks
        are stacked in that layout, else stacked inside the step from the per-block parameters (and the
        gradient split back), which costs a copy of the weights and of their gradients."""
        if self.slots is not None:
            return nnx.graphdef(self.blocks), slots.take(nnx.state(self.blocks), self.slots)
        return nnx.graphdef(self.blocks[0]), slots.stack([nnx.state(b) for b in self.blocks])

    def _block_fn(self, graphdef, attention, remat: bool = True):
        """`(weights, x, positions, segment_ids) -> x` of one block, with the model's remat policy
        (`remat=False`: without)."""
        cfg = self.cfg

        def run(weights, x, positions, segment_ids):
            x = gradient_barrier(x)
            alibi = alibi_slopes(cfg.heads) if cfg.family == "bloom" else None
            return nnx.merge(graphdef, weights)(x, positions, segment_ids, alibi, attention=attention)

        return run if cfg.remat == "none" or not remat else jax.checkpoint(run, policy=_REMAT_POLICIES[cfg.remat])

    def _scanned_blocks(self, x, positions, segment_ids, attention):
        """The blocks as one `jax.lax.scan` over their stacked weights: XLA compiles one block, with the
        same remat policy, instead of `layers`. Random-LTD, whose layers differ, runs unrolled."""
        graphdef, stacked = self._stacked(BlockSlots.of(self.cfg.layers))
        block = self._block_fn(graphdef, attention)
        x, _ = jax.lax.scan(lambda x, weights: (block(weights, x, positions, segment_ids), None), x, stacked)
        return x

    def _check_pipelined(self, ltd) -> None:
        if ltd is not None:
            raise UserError("config key 'mesh.stage': random-LTD's per-layer token subsets do not run pipelined; "
                            "set mesh.stage=1 or disable random_ltd")
        if not self._stackable():
            raise UserError("config key 'mesh.stage': the blocks' weights differ in structure (per-layer "
                            "compression), so they cannot be split into stages; set mesh.stage=1")

    def _kept_tokens_block(self, block, alibi, implementation):
        """`block` as a function of the gathered tokens, their positions, segments and original indices."""

        def run(blk, xs, ps, ss, idx):
            return blk(xs, ps, ss, alibi, kept_index=idx, implementation=implementation)

        if self.cfg.remat != "none":
            run = nnx.remat(run, policy=_REMAT_POLICIES[self.cfg.remat])
        return lambda xs, ps, ss, idx: run(block, xs, ps, ss, idx)

    def _embed(self, tokens, positions, embeddings=None):
        # Gather rows from a whole table: a gather from a vocab-sharded table cannot be partitioned
        # efficiently, while all-gathering the table is what FSDP does for every weight anyway.
        if embeddings is None:
            x = embedding_lookup(self.embed[...], tokens)
        else:
            x = embeddings.astype(jnp.float32)
        if self.pos_embed is not None:
            x = x + jnp.take(constrain(self.pos_embed[...], (None, None)), positions, axis=0)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def _logits(self, x):
        x = self.final_norm(x)
        if self.head is None:  # tied: contract with the embedding table's model axis
            return linear(x, self.embed[...], self.cfg.compute_dtype, transpose_w=True)
        return linear(x, self.head[...], self.cfg.compute_dtype)


def _stacked_module(blocks: list[Block], slots: BlockSlots) -> Block:
    """One `Block` whose weights are the blocks' stacked in layout `slots` (logical axis "layers" first)."""

    def stack(*variables):
        return variables[0].replace(value=slots.stack([v[...] for v in variables]),
                                    logical_axes=("layers", *variables[0].logical_axes))

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    state = jax.tree.map(stack, *(nnx.state(b) for b in blocks), is_leaf=is_variable)
    return nnx.merge(nnx.graphdef(blocks[0]), state)


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
