"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling, stop tokens.

Three layers, each usable alone:

- `filter_logits` / `sample_logits`: the sampling rule on one step's f32 logits `[batch, vocab]`.
- `generate_tokens(model, prompt_tokens, prompt_lengths, key, ...)`: a pure, traceable function of
  arrays. The prompts come left-padded to a common width `P`; one `Decoder.decode` call prefills the
  cache with all of them, then a `lax.while_loop` feeds one token per row per step until every row has
  hit a stop token or `max_new_tokens` are made. It returns fixed-shape arrays (`Generation`): the new
  tokens, each row's length and the model's log-probabilities of the chosen tokens, which is what
  an RL experience phase needs. Call it inside your own `jax.jit`, e.g. with
  `jaxllm.models.definition.ModelDef.bind(params)` as the model, or use `generate_jit`.
- `generate(model, prompts, ...)`: lists of token ids in, lists of new token ids out.

And a command: ``python -m jaxllm.generate --workdir DIR --prompt "text" [...]`` (`jaxllm/generate/__main__.py`).

Conventions, as in Hugging Face `generate`: a stop token that ends a row is part of its output (and
counted in its length); later slots hold `pad_id`. `temperature=0` is greedy decoding. Sampling
applies temperature, then top-k, then top-p to f32 logits. Example::

    from jaxllm.generate import generate
    new = generate(model, [[5, 17, 9], [42]], max_new_tokens=20, temperature=0.8, top_p=0.9,
                   stop_tokens=(3,), seed=0)   # [[...up to 20 ids...], [...]]

Sharded parameters: build or restore the model's parameters on a mesh (say `mesh.tensor=2`) and call
under ``with jax.set_mesh(mesh):``; the cache then shards over `kv_heads` where the tensor axis
divides them, and the tokens equal those of an unsharded run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray

from jaxllm.compression import checkpoint as compressed_checkpoint
from jaxllm.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, TextTokenizer, load_tokenizer, workdir_tokenizer_file
from jaxllm.engine.checkpoint import Checkpointer, model_config, workdir_step
from jaxllm.engine.state import ParamTree
from jaxllm.errors import UserError
from jaxllm.models.decoder import Decoder, KVCache
from jaxllm.models.definition import ModelDef


class Generation(NamedTuple):
    """Fixed-shape result of `generate_tokens` for `batch` rows and `n = max_new_tokens`.

    tokens:   [batch, n] int32 new tokens; slots after a row's end hold `pad_id`.
    lengths:  [batch] int32 number of new tokens of each row, a closing stop token included.
    logprobs: [batch, n] f32 log p(token | prefix) under the model's own distribution (softmax of the
              raw logits: temperature 1, no top-k/top-p), 0 after a row's end. Sum it over a row for the
              sequence log-likelihood; PPO's old-policy log-probs are exactly these.
    """

    tokens: Int[Array, "batch n"]
    lengths: Int[Array, " batch"]
    logprobs: Float[Array, "batch n"]


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raises UserError for a temperature < 0, a top_k < 0, or a top_p outside (0, 1]."""
    if not temperature >= 0:
        raise UserError(f"temperature: got {temperature}; expected a number >= 0 (0 is greedy)")
    if int(top_k) != top_k or top_k < 0:
        raise UserError(f"top_k: got {top_k}; expected an integer >= 0 (0 keeps every token)")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p: got {top_p}; expected a value in (0, 1] (1 keeps every token)")


def filter_logits(
    logits: Float[Array, "... vocab"], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Float[Array, "... vocab"]:
    """Logits of the distribution to sample from: scaled, with removed tokens set to -inf.

    In order: `z = logits / temperature`; top-k keeps tokens with `z >= z_(k)`, the k-th largest
    (ties at the boundary are all kept); top-p (nucleus sampling, Holtzman et al., 2020, "The Curious
    Case of Neural Text Degeneration") keeps the smallest set of most likely tokens whose probability
    under softmax(z) (after top-k) reaches `top_p`: sorted by decreasing probability, token i stays
    when the mass strictly before it is below `top_p`, so the most likely token always stays; tokens
    tied with the least likely kept one also stay. `softmax` of the result is the renormalised
    filtered distribution. `top_k=0` and `top_p=1` disable their filters; `temperature` must be > 0.
    """
    z = logits.astype(jnp.float32) / jnp.float32(temperature)
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p < 1.0:
        ordered = -jnp.sort(-z, axis=-1)  # decreasing
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < threshold, -jnp.inf, z)
    return z


def sample_logits(
    key: PRNGKeyArray, logits: Float[Array, "batch vocab"], temperature: float = 0.0, top_k: int = 0,
    top_p: float = 1.0,
) -> Int[Array, " batch"]:
    """One token per row: argmax for `temperature == 0`, else a draw from softmax(filter_logits(...))."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def generate_tokens(
    model: Decoder,
    prompt_tokens: Int[Array, "batch width"],
    prompt_lengths: Int[Array, " batch"],
    key: PRNGKeyArray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
) -> Generation:
    """Generates up to `max_new_tokens` per row after left-padded prompts; pure and traceable.

    Args:
      model: a `Decoder` (its parameters may be tracers, e.g. `ModelDef.bind(params)` inside `jit`).
      prompt_tokens: prompts right-aligned in `width` columns; row b's prompt is its last
        `prompt_lengths[b]` entries (the padding before it is never attended to).
      prompt_lengths: each in [1, width].
      key: PRNG key; step i samples with `fold_in(key, i)`. Unused when greedy.
      max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id: static settings (see the
        module docstring); `width + max_new_tokens` must not exceed `model.cfg.max_len`.

    Returns:
      `Generation` with `[batch, max_new_tokens]` tokens and log-probs and `[batch]` lengths.

    The cache has `width + max_new_tokens` slots; the prefill is one `decode` call over the prompt
    block, and each later step one `decode` call on a single token per row, inside a `lax.while_loop`
    that ends early once every row has stopped.
    """
    tokens = jnp.asarray(prompt_tokens, jnp.int32)
    width = tokens.shape[1]
    return decode_loop(model, width, width - jnp.asarray(prompt_lengths, jnp.int32),
                       lambda model, cache: model.decode(tokens, cache, last_only=True),
                       lambda model, last, cache: model.decode(last, cache), key,
                       Sampling.of(max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id))


Prefill = Callable[[Any, KVCache], tuple[Float[Array, "batch 1 vocab"], KVCache]]
Step = Callable[[Any, Int[Array, "batch 1"], KVCache], tuple[Float[Array, "batch 1 vocab"], KVCache]]


class Sampling(NamedTuple):
    """Generation settings as hashable Python values, so they can be a static `jit` argument (one
    compilation each); see the module docstring for their meaning."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0

    @classmethod
    def of(cls, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           stop_tokens: Sequence[int] = (), pad_id: int = 0) -> Sampling:
        """The settings with every value converted to its plain Python type (ints from numpy, a tuple)."""
        return cls(int(max_new_tokens), float(temperature), int(top_k), float(top_p),
                   tuple(int(t) for t in stop_tokens), int(pad_id))


def decode_loop(model: Any, width: int, start: Int[Array, " batch"], prefill: Prefill, step: Step, key: PRNGKeyArray,
                sampling: Sampling) -> Generation:
    """Cached generation for any model that decodes with a `KVCache` (`Decoder`, `VisualChat`).

    Checks the settings, builds a cache of `width + max_new_tokens` slots in which row b starts at
    `start[b]`, fills it with `prefill(model, cache)` (the prompt block) and then feeds one new token
    per row per step with `step(model, tokens [batch, 1], cache)`; both return the logits at their
    last position `[batch, 1, vocab]` and the cache. Step i samples with `fold_in(key, i)`; a row
    stops after a stop token (kept in the output) and then emits `pad_id` with log-prob 0; the loop
    ends early once every row has stopped. Log-probs are those of the raw (unfiltered) distribution.
    """
    cfg = model.cfg
    max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id = sampling
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens: got {max_new_tokens}; expected a positive integer")
    if width + max_new_tokens > cfg.max_len:
        raise UserError(f"prompt width {width} + max_new_tokens {max_new_tokens} = {width + max_new_tokens} "
                        f"tokens exceed the model's max_len={cfg.max_len}")
    check_sampling(temperature, top_k, top_p)
    batch = start.shape[0]
    graphdef, params = nnx.split(model)  # the loop body merges them: a module cannot be carried by while_loop
    first_logits, cache = prefill(model, KVCache.init(cfg, batch, width + max_new_tokens, start))
    stops = jnp.asarray(list(stop_tokens), jnp.int32)

    def pick(logits, step):
        logits = logits[:, 0].astype(jnp.float32)
        token = sample_logits(jax.random.fold_in(key, step), logits, temperature, top_k, top_p)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        return token, logprob

    def stopped(token):
        return jnp.any(token[:, None] == stops[None, :], axis=-1) if len(stop_tokens) else jnp.zeros_like(token, bool)

    token, logprob = pick(first_logits, 0)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    state = (jnp.int32(1), token, stopped(token), jnp.ones((batch,), jnp.int32), tokens, logprobs, cache)

    def running(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(state):
        i, last, done, lengths, tokens, logprobs, cache = state
        logits, cache = step(nnx.merge(graphdef, params), last[:, None], cache)
        token, logprob = pick(logits, i)
        token = jnp.where(done, pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, token, done | stopped(token), lengths, tokens, logprobs, cache

    _, _, _, lengths, tokens, logprobs, _ = jax.lax.while_loop(running, advance, state)
    return Generation(tokens, lengths, logprobs)


class _Graph:
    """A graph definition as a static `jit` argument: hashable (by its text) and compared by value."""

    def __init__(self, graphdef: Any):
        self.graphdef, self._hash = graphdef, hash(repr(graphdef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Graph) and self._hash == other._hash and self.graphdef == other.graphdef


@functools.partial(jax.jit, static_argnames=("graph", "sampling"))
def _generate_jit(graph: _Graph, params, prompt_tokens, prompt_lengths, key, sampling: Sampling):
    return generate_tokens(nnx.merge(graph.graphdef, params), prompt_tokens, prompt_lengths, key, **sampling._asdict())


def generate_jit(
    graphdef: Any, params: Any, prompt_tokens: Int[Array, "batch width"], prompt_lengths: Int[Array, " batch"],
    key: PRNGKeyArray, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    stop_tokens: Sequence[int] = (), pad_id: int = 0,
) -> Generation:
    """`generate_tokens` under `jax.jit`, for a split model: `graphdef, params = nnx.split(model)`.

    Compiled once per model graph, batch size, prompt width and settings (the compilation is cached
    across calls); the parameters keep whatever sharding they have.
    """
    return _generate_jit(_Graph(graphdef), params, prompt_tokens, prompt_lengths, key,
                         sampling=Sampling.of(max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id))


def lower_generate(graphdef: Any, params: Any, prompt_tokens: Any, prompt_lengths: Any, key: Any,
                   sampling: Sampling) -> Any:
    """`generate_jit`'s program lowered for these arguments (arrays or `jax.ShapeDtypeStruct`s carrying
    shardings) without running it: what `jaxllm.aot.generate` compiles for a TPU or GPU target."""
    return _generate_jit.lower(_Graph(graphdef), params, prompt_tokens, prompt_lengths, key, sampling=sampling)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligns prompts in a `[batch, width]` int32 array; returns it and the prompt lengths.

    `width` defaults to the longest prompt rounded up to `multiple` (fewer distinct widths mean fewer
    compilations; the padding is masked, so it changes no result).
    """
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if width is None:
        width = int(-(-lengths.max() // multiple) * multiple)
    out = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        out[row, width - len(prompt):] = prompt
    return out, lengths


def prompt_width(longest: int, max_len: int, max_new_tokens: int) -> int:
    """The padded prompt width `generate` compiles for: the longest prompt rounded up to a multiple of
    16, as far as `max_len - max_new_tokens` allows (the KV cache holds `width + max_new_tokens` slots)."""
    return min(-(-longest // 16) * 16, max_len - max_new_tokens)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_len: int, max_new_tokens: int) -> None:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise UserError("prompts: expected a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not len(prompt):
            raise UserError(f"prompt {i}: expected a non-empty list of token ids, got {prompt!r}")
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
            raise UserError(f"prompt {i}: expected a flat list of integer token ids")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise UserError(f"prompt {i}: token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                            f"is outside the vocabulary [0, {vocab_size})")
        if len(prompt) + max_new_tokens > max_len:
            raise UserError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                            f"{len(prompt) + max_new_tokens}, more than the model's max_len={max_len}")


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    return_logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """New token ids for each prompt (a list of token-id lists, lengths may differ).

    Each row stops after `max_new_tokens` or at the first token in `stop_tokens`, which is included.
    `temperature=0` is greedy (then `top_k`, `top_p` and `seed` do not matter); otherwise tokens are
    drawn from the filtered distribution of `filter_logits` with keys derived from `seed`. With
    `return_logprobs`, also returns the model's log-probability of each new token (see `Generation`).
    Prompts are left-padded to a width rounded up to a multiple of 16 (when `max_len` allows), so
    batches of similar prompts reuse one compilation.
    """
    cfg = model.cfg
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise UserError(f"max_new_tokens: got {max_new_tokens}; expected a positive integer")
    check_sampling(temperature, top_k, top_p)
    _check_prompts(prompts, cfg.vocab_size, cfg.max_len, max_new_tokens)
    width = prompt_width(max(len(p) for p in prompts), cfg.max_len, max_new_tokens)
    tokens, lengths = left_pad(prompts, pad_id, width)
    graphdef, params = nnx.split(model)
    out = generate_jit(graphdef, params, tokens, lengths, jax.random.key(seed), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id)
    new_tokens, lengths, logprobs = jax.device_get((out.tokens, out.lengths, out.logprobs))
    ids = [row[:n].tolist() for row, n in zip(new_tokens, lengths, strict=True)]
    if return_logprobs:
        return ids, [row[:n].tolist() for row, n in zip(logprobs, lengths, strict=True)]
    return ids


# ----------------------------------------------------------------------------------------------------
# Loading a model to generate with


def load_workdir(workdir: str | Path, mesh: Mesh, step: int | None = None,
                 compute_dtype: str | None = None) -> tuple[Decoder, int]:
    """The model of a training workdir's latest (or given) checkpoint, parameters restored onto `mesh`.

    Reads the model settings saved with the checkpoint (`meta`) and only the `params` part of the
    state (no optimizer state), each tensor straight into its shards. Returns the model and the step.
    """
    workdir = Path(workdir)
    directory, step = workdir_step(workdir, step)
    if compressed_checkpoint.is_compressed_checkpoint(workdir, step):  # written by python -m jaxllm.compress
        return compressed_checkpoint.load_workdir(workdir, mesh, step, compute_dtype)
    ckpt = Checkpointer(directory, async_save=False)
    try:
        saved = ckpt.read_meta(step).get("model")
        if not isinstance(saved, dict):
            raise UserError(f"checkpoint {directory / str(step)}: its meta holds no model settings")
        cfg = model_config(saved)
        if compute_dtype is not None:
            cfg = dataclasses.replace(cfg, compute_dtype=compute_dtype)
        cfg.validate()
        model_def = ModelDef.from_config(cfg)
        params = ckpt.restore_part(step, {"params": ParamTree.of(model_def).placed(mesh)})["params"]
    finally:
        ckpt.close()
    return model_def.bind(params), step


def load_hf(path: str | Path, mesh: Mesh, compute_dtype: str | None = None) -> Decoder:
    """A Hugging Face checkpoint directory as a `Decoder`, each parameter read into its shards on `mesh`."""
    from jaxllm.interop import hf  # imported here: needs the optional interop dependencies

    if not Path(path).is_dir():
        raise UserError(f"--hf {path}: directory not found")
    model, _ = hf.load(path, mesh=mesh, compute_dtype=compute_dtype or "float32")
    return model


def find_tokenizer(explicit: str | None, workdir: str | None, hf_dir: str | None) -> TextTokenizer | None:
    """`--tokenizer` (a file or directory) if given, else the tokenizer the run or checkpoint carries.

    A workdir's is `WORKDIR/data/tokenizer.json` or `tokenizer.model`, where every run keeps the one
    its data was tokenized with (trained for `data.source=text`, copied from the shard directory for
    `tokens`, from the teacher for a compressed run); a Hugging Face directory's is its
    `tokenizer.json` or `tokenizer.model`. Returns None when there is none.
    """
    if explicit is not None:
        return load_tokenizer(explicit)
    if workdir is not None:
        kept = workdir_tokenizer_file(workdir)
        return load_tokenizer(kept) if kept is not None else None
    if any((Path(hf_dir) / name).is_file() for name in (HF_FILE, SENTENCEPIECE_FILE)):
        return load_tokenizer(hf_dir)
    return None
