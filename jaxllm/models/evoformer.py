"""AlphaFold 2's Evoformer (Jumper et al., 2021, Nature 596:583, supplement section 1.6), built on
`jaxllm.ops.evoformer_attention`.

Shapes: the MSA representation `m` is `[B, S, R, c_m]` (S aligned sequences, R residues), the pair
representation `z` is `[B, R, R, c_z]`; `msa_mask` `[B, S, R]` and `pair_mask` `[B, R, R]` are 1 for
real entries. Every attention is one call of the op with DeepSpeed4Science's bias layout:

| module (supplement algorithm)       | q, k, v `[B, N, L, H, c]` | biases                                  |
|-------------------------------------|---------------------------|-----------------------------------------|
| MSA row attention + pair bias (7)   | N = S, L = R              | mask `[B, S, 1, 1, R]`, pair `[B, 1, H, R, R]` |
| MSA column attention (8)            | N = R, L = S              | mask `[B, R, 1, 1, S]`                  |
| triangle attention, starting (13)   | N = R (i), L = R (k)      | mask `[B, R, 1, 1, R]`, `b_jk` `[B, 1, H, R, R]` |
| triangle attention, ending (14)     | the starting-node module on `z^T`, transposed back      |

Masks enter as DeepSpeed's and OpenFold's additive `1e9 * (mask - 1)`. Each block (Algorithm 6)
applies, with residual connections: row attention, column attention, MSA transition, outer product
mean, triangle multiplication outgoing and incoming, triangle attention starting and ending node,
pair transition. Dropout is left out (the stack here is deterministic). Parameters are f32; `dtype`
sets the compute dtype of projections and attention (LayerNorm and softmax stay f32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxllm.ops.evoformer import evoformer_attention

MASK_SCALE = 1e9


def mask_bias(mask: jax.Array, dtype) -> jax.Array:
    """`[B, N, L]` 0/1 mask -> `[B, N, 1, 1, L]` additive key bias `1e9 * (mask - 1)`."""
    return (MASK_SCALE * (mask.astype(jnp.float32) - 1.0))[:, :, None, None, :].astype(dtype)


class GatedAttention(nnx.Module):
    """Multi-head attention over axis 2 of `[B, N, L, c]` with sigmoid gating (supplement 1.6.1).

    `o = Linear(g * softmax(q k^T / sqrt(c) + biases) v)`, `g = sigmoid(Linear(x))`, q, k, v from
    bias-free projections of `x` (which the caller has layer-normed).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 implementation: str = "auto"):
        self.heads, self.head_dim, self.implementation = heads, head_dim, implementation
        inner = heads * head_dim
        self.query = nnx.Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs)
        self.gate = nnx.Linear(dim, inner, dtype=dtype, bias_init=nnx.initializers.ones, rngs=rngs)
        self.output = nnx.Linear(inner, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "b n l c"], biases) -> Float[Array, "b n l c"]:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        biases = [b.astype(q.dtype) for b in biases]
        o = evoformer_attention(q, k, v, biases, implementation=self.implementation)
        o = jax.nn.sigmoid(split(self.gate(x)).astype(jnp.float32)) * o.astype(jnp.float32)
        return self.output(o.reshape(*o.shape[:-2], -1).astype(q.dtype)).astype(jnp.float32)


class MSARowAttentionWithPairBias(nnx.Module):
    """Algorithm 7: each MSA row attends over residues, biased by a per-head projection of `z`."""

    def __init__(self, c_m: int, c_z: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, **kw):
        self.norm_m = nnx.LayerNorm(c_m, rngs=rngs)
        self.norm_z = nnx.LayerNorm(c_z, rngs=rngs)
        self.pair_bias = nnx.Linear(c_z, heads, use_bias=False, rngs=rngs)
        self.attention = GatedAttention(c_m, heads, head_dim, rngs=rngs, **kw)

    def __call__(self, m: Float[Array, "b s r cm"], z: Float[Array, "b r r cz"], msa_mask: Float[Array, "b s r"]):
        pair = self.pair_bias(self.norm_z(z)).transpose(0, 3, 1, 2)[:, None]  # [B, 1, H, R, R]
        return self.attention(self.norm_m(m), [mask_bias(msa_mask, pair.dtype), pair])


class MSAColumnAttention(nnx.Module):
    """Algorithm 8: each residue column attends over the sequences."""

    def __init__(self, c_m: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, **kw):
        self.norm = nnx.LayerNorm(c_m, rngs=rngs)
        self.attention = GatedAttention(c_m, heads, head_dim, rngs=rngs, **kw)

    def __call__(self, m: Float[Array, "b s r cm"], msa_mask: Float[Array, "b s r"]):
        mt = m.swapaxes(1, 2)  # [B, R, S, c_m]
        out = self.attention(self.norm(mt), [mask_bias(msa_mask.swapaxes(1, 2), jnp.float32)])
        return out.swapaxes(1, 2)


class TriangleAttention(nnx.Module):
    """Algorithms 13 (starting node) and 14 (ending node).

    Starting node: `o_ij = g_ij * sum_k softmax_k(q_ij . k_ik / sqrt(c) + b_jk) v_ik`, rows i as the
    op's N axis. Ending node: `o_ij = g_ij * sum_k softmax_k(q_ij . k_kj / sqrt(c) + b_ki) v_kj`, which
    is the starting-node computation on `z^T` (and `pair_mask^T`), transposed back.
    """

    def __init__(self, c_z: int, heads: int, head_dim: int, *, starting: bool, rngs: nnx.Rngs, **kw):
        self.starting = starting
        self.norm = nnx.LayerNorm(c_z, rngs=rngs)
        self.triangle_bias = nnx.Linear(c_z, heads, use_bias=False, rngs=rngs)
        self.attention = GatedAttention(c_z, heads, head_dim, rngs=rngs, **kw)

    def __call__(self, z: Float[Array, "b r r cz"], pair_mask: Float[Array, "b r r"]):
        if not self.starting:
            z, pair_mask = z.swapaxes(1, 2), pair_mask.swapaxes(1, 2)
        x = self.norm(z)
        triangle = self.triangle_bias(x).transpose(0, 3, 1, 2)[:, None]  # b_jk: [B, 1, H, R, R]
        out = self.attention(x, [mask_bias(pair_mask, triangle.dtype), triangle])
        return out if self.starting else out.swapaxes(1, 2)


class Transition(nnx.Module):
    """Algorithms 9 and 15: LayerNorm, Linear(c -> n c), ReLU, Linear(n c -> c)."""

    def __init__(self, dim: int, factor: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, factor * dim, rngs=rngs)
        self.down = nnx.Linear(factor * dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(self.norm(x))))


class OuterProductMean(nnx.Module):
    """Algorithm 10: `z_ij += Linear(mean_s a_si (x) b_sj)`, the mean over unmasked sequences."""

    def __init__(self, c_m: int, c_z: int, hidden: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(c_m, rngs=rngs)
        self.left = nnx.Linear(c_m, hidden, rngs=rngs)
        self.right = nnx.Linear(c_m, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden * hidden, c_z, rngs=rngs)

    def __call__(self, m, msa_mask):
        x = self.norm(m)
        a = self.left(x) * msa_mask[..., None]
        b = self.right(x) * msa_mask[..., None]
        outer = jnp.einsum("bsic,bsjd->bijcd", a, b)
        count = jnp.einsum("bsi,bsj->bij", msa_mask, msa_mask)[..., None]
        return self.output(outer.reshape(*outer.shape[:3], -1)) / (count + 1e-3)


class TriangleMultiplication(nnx.Module):
    """Algorithms 11 (outgoing: `sum_k a_ik b_jk`) and 12 (incoming: `sum_k a_ki b_kj`)."""

    def __init__(self, c_z: int, hidden: int, *, outgoing: bool, rngs: nnx.Rngs):
        self.outgoing = outgoing
        self.norm_in = nnx.LayerNorm(c_z, rngs=rngs)
        self.left, self.left_gate = nnx.Linear(c_z, hidden, rngs=rngs), nnx.Linear(c_z, hidden, rngs=rngs)
        self.right, self.right_gate = nnx.Linear(c_z, hidden, rngs=rngs), nnx.Linear(c_z, hidden, rngs=rngs)
        self.norm_out = nnx.LayerNorm(hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, c_z, rngs=rngs)
        self.gate = nnx.Linear(c_z, c_z, rngs=rngs)

    def __call__(self, z, pair_mask):
        x = self.norm_in(z)
        mask = pair_mask[..., None]
        a = jax.nn.sigmoid(self.left_gate(x)) * self.left(x) * mask
        b = jax.nn.sigmoid(self.right_gate(x)) * self.right(x) * mask
        spec = "bikc,bjkc->bijc" if self.outgoing else "bkic,bkjc->bijc"
        return jax.nn.sigmoid(self.gate(x)) * self.output(self.norm_out(jnp.einsum(spec, a, b)))


class EvoformerBlock(nnx.Module):
    """Algorithm 6: one Evoformer block, every update residual."""

    def __init__(self, c_m: int, c_z: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 implementation: str = "auto"):
        kw = dict(rngs=rngs, dtype=dtype, implementation=implementation)
        self.row = MSARowAttentionWithPairBias(c_m, c_z, heads, head_dim, **kw)
        self.column = MSAColumnAttention(c_m, heads, head_dim, **kw)
        self.msa_transition = Transition(c_m, 4, rngs=rngs)
        self.outer = OuterProductMean(c_m, c_z, head_dim, rngs=rngs)
        self.tri_out = TriangleMultiplication(c_z, c_z, outgoing=True, rngs=rngs)
        self.tri_in = TriangleMultiplication(c_z, c_z, outgoing=False, rngs=rngs)
        self.tri_start = TriangleAttention(c_z, heads, head_dim, starting=True, **kw)
        self.tri_end = TriangleAttention(c_z, heads, head_dim, starting=False, **kw)
        self.pair_transition = Transition(c_z, 4, rngs=rngs)

    def __call__(self, m, z, msa_mask, pair_mask):
        m = m + self.row(m, z, msa_mask)
        m = m + self.column(m, msa_mask)
        m = m + self.msa_transition(m)
        z = z + self.outer(m, msa_mask)
        z = z + self.tri_out(z, pair_mask)
        z = z + self.tri_in(z, pair_mask)
        z = z + self.tri_start(z, pair_mask)
        z = z + self.tri_end(z, pair_mask)
        return m, z + self.pair_transition(z)


class EvoformerStack(nnx.Module):
    """`blocks` Evoformer blocks applied in sequence to `(m, z)`.

    The blocks' parameters are stacked along a leading axis (built with `nnx.vmap`) and applied with
    `nnx.scan`, so a deep stack compiles as one block (AlphaFold 2 uses 48).
    """

    def __init__(self, blocks: int, c_m: int, c_z: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, **kw):
        @nnx.split_rngs(splits=blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return EvoformerBlock(c_m, c_z, heads, head_dim, rngs=rngs, **kw)

        self.blocks = make(rngs)

    def __call__(self, m: Float[Array, "b s r cm"], z: Float[Array, "b r r cz"], msa_mask: Float[Array, "b s r"],
                 pair_mask: Float[Array, "b r r"]):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, carry):
            return block(*carry, msa_mask, pair_mask)

        return run(self.blocks, (m, z))


class ContactPredictor(nnx.Module):
    """A small end-to-end model: MSA tokens -> Evoformer stack -> pair logits `[B, R, R]`.

    Embeddings follow the supplement's input embedder in miniature (Algorithm 3): the MSA embedding
    is a token embedding; the pair is initialised from the query sequence (`a_i + b_j`) plus a
    clipped relative-position embedding (Algorithm 4). The head is a symmetrised linear map of `z`.
    """

    def __init__(self, vocab: int, blocks: int = 2, c_m: int = 16, c_z: int = 16, heads: int = 2,
                 head_dim: int = 8, max_relative: int = 8, *, rngs: nnx.Rngs, **kw):
        self.max_relative = max_relative
        self.msa_embed = nnx.Embed(vocab, c_m, rngs=rngs)
        self.left = nnx.Embed(vocab, c_z, rngs=rngs)
        self.right = nnx.Embed(vocab, c_z, rngs=rngs)
        self.relative = nnx.Embed(2 * max_relative + 1, c_z, rngs=rngs)
        self.stack = EvoformerStack(blocks, c_m, c_z, heads, head_dim, rngs=rngs, **kw)
        self.norm = nnx.LayerNorm(c_z, rngs=rngs)
        self.head = nnx.Linear(c_z, 1, rngs=rngs)

    def __call__(self, msa, msa_mask):
        """`msa` `[B, S, R]` int tokens (row 0 is the query sequence), `msa_mask` `[B, S, R]` -> `[B, R, R]`."""
        msa_mask = msa_mask.astype(jnp.float32)
        query = msa[:, 0]
        length = msa.shape[2]
        offset = jnp.clip(jnp.arange(length)[None, :] - jnp.arange(length)[:, None], -self.max_relative,
                          self.max_relative)
        z = self.left(query)[:, :, None] + self.right(query)[:, None, :] + self.relative(offset + self.max_relative)
        pair_mask = msa_mask[:, 0, :, None] * msa_mask[:, 0, None, :]
        _, z = self.stack(self.msa_embed(msa), z, msa_mask, pair_mask)
        logits = self.head(self.norm(z))[..., 0]
        return 0.5 * (logits + logits.swapaxes(1, 2))
