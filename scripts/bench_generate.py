"""Decode throughput with the KV cache versus recomputing the whole sequence for every token, in one run.

    python scripts/bench_generate.py [--config FILE] [--batch 8] [--prompt-len 32] [--new-tokens 256]
                                     [--bucket 32] [--repeats 1] [--json out.json] [section.key=value ...]

Defaults to the reference throughput model (`configs/gpt2_6l_512d.yaml`: GPT-2, 6 layers, d_model 512,
8 heads, vocab 32000) with `model.max_len=512` so that prompt + 256 new tokens fit, random weights,
one device. The batch holds `--batch` random prompts of lengths spread over [prompt_len / 2,
prompt_len] (left-padded), and both methods decode greedily for exactly `--new-tokens` tokens:

- cache: `jaxllm.generate.generate_jit`, one prefill then a `lax.while_loop` of one-token steps
  over a preallocated KV cache;
- recompute: for every new token, the training forward (`Decoder` blocks with segment masks and
  positions for the left padding) over the whole sequence so far, padded on the right to a multiple
  of `--bucket` columns so that a handful of compilations serve all lengths; only the last column
  goes through the output head (the cheapest honest baseline). Each bucket is compiled before timing.

Tokens/s counts new tokens of all rows (batch x new_tokens / seconds), compile excluded; times are
medians, the cached runs (2 before and 2 after the recompute runs) bracketing the recompute ones. The
two methods' tokens are compared (greedy: they should agree, up to near-ties in the logits).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import config as config_lib
from jaxllm.generate import generate_jit, left_pad
from jaxllm.models.decoder import Decoder
from jaxllm.models.definition import ModelDef, init_params
from jaxllm.ops.attention import alibi_slopes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "gpt2_6l_512d.yaml"


def last_logits(model: Decoder, tokens, positions, segment_ids, last):
    """The training forward over `tokens`, with the output head applied at column `last` only."""
    x = model._embed(tokens, positions)
    alibi = alibi_slopes(model.cfg.heads) if model.cfg.family == "bloom" else None
    for block in model.blocks:
        x = block(x, positions, segment_ids, alibi)
    return model._logits(jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef_box", "columns"))
def recompute_step(graphdef_box, buffer, params, start, cur, *, columns):
    """Reads columns [0, columns) of the sequence buffer, appends the greedy next token at `cur`."""
    model = nnx.merge(graphdef_box.graphdef, params)
    tokens = buffer[:, :columns]
    col = jnp.arange(columns)[None, :]
    positions = jnp.maximum(col - start[:, None], 0)
    segment_ids = (col >= start[:, None]).astype(jnp.int32)
    logits = last_logits(model, tokens, positions, segment_ids, cur - 1)
    token = jnp.argmax(logits, axis=-1).astype(buffer.dtype)
    return jax.lax.dynamic_update_slice(buffer, token[:, None], (0, cur))


class _Box:
    """Hashable holder so a graph definition can be a static jit argument."""

    def __init__(self, graphdef):
        self.graphdef, self._key = graphdef, repr(graphdef)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Box) and self._key == other._key


def run_recompute(box, params, tokens, lengths, new_tokens, bucket, compile_only=False):
    """Greedy decoding by recomputation; with `compile_only`, one step per bucket width (to compile)."""
    batch, width = tokens.shape
    total = width + new_tokens
    start = jnp.asarray(width - lengths, jnp.int32)
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :width].set(tokens)
    seen = set()
    for cur in range(width, total):
        columns = min(-(-cur // bucket) * bucket, total)
        if compile_only and columns in seen:
            continue
        seen.add(columns)
        buffer = recompute_step(box, buffer, params, start, jnp.int32(cur), columns=columns)
    return buffer[:, width:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed recompute runs (the cache gets 4); median")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.compute_dtype=bfloat16")
    args = parser.parse_args()

    cfg = config_lib.load(args.config, ["model.max_len=512", *args.overrides]).model
    device = jax.devices()[0]
    rng = np.random.default_rng(0)
    lengths = np.linspace(max(1, args.prompt_len // 2), args.prompt_len, args.batch).astype(int)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    tokens, lengths = left_pad(prompts)
    with jax.default_device(device):
        params = jax.device_put(init_params(cfg, 0), device)
        graphdef, state = nnx.split(ModelDef.from_config(cfg).bind(params))
        key = jax.random.key(0)

        def cached(compile_only=False):
            out = generate_jit(graphdef, state, tokens, lengths, key, max_new_tokens=args.new_tokens)
            return jax.block_until_ready(out.tokens)

        box = _Box(graphdef)

        def recomputed(compile_only=False):
            return jax.block_until_ready(run_recompute(box, state, jnp.asarray(tokens), lengths, args.new_tokens,
                                                       args.bucket, compile_only))

        warmup, times, outputs = {}, {"cache": [], "recompute": []}, {}
        for name, fn in (("cache", cached), ("recompute", recomputed)):
            begin = time.perf_counter()
            fn(compile_only=True)  # compiles (each bucket width, for recompute)
            warmup[name] = time.perf_counter() - begin
        # The short cached runs go before and after the long recompute runs, so that a change in machine
        # load during the run affects both methods alike.
        order = ["cache"] * 2 + ["recompute"] * args.repeats + ["cache"] * 2
        for name in order:
            begin = time.perf_counter()
            outputs[name] = np.asarray((cached if name == "cache" else recomputed)())
            times[name].append(time.perf_counter() - begin)
        results = {}
        for name in ("cache", "recompute"):
            seconds = float(np.median(times[name]))
            results[name] = {"seconds": seconds, "tokens_per_sec": args.batch * args.new_tokens / seconds,
                             "runs_s": times[name], "warmup_s": warmup[name]}
    agree = float(np.mean(outputs["cache"] == outputs["recompute"]))
    ratio = results["cache"]["tokens_per_sec"] / results["recompute"]["tokens_per_sec"]
    m = cfg
    print(f"device: {device.device_kind} ({device.platform}); model {m.family} {m.layers}L d{m.d_model} "
          f"h{m.heads} vocab {m.vocab_size} {m.compute_dtype}; batch {args.batch}, prompts {lengths.min()}-"
          f"{lengths.max()} tokens, {args.new_tokens} new tokens, recompute bucket {args.bucket}")
    print(f"{'method':>10} {'seconds':>8} {'tokens/s':>9} {'warm-up s':>10}")
    for name, r in results.items():
        print(f"{name:>10} {r['seconds']:8.2f} {r['tokens_per_sec']:9.1f} {r['warmup_s']:10.2f}")
    print(f"KV cache / recompute: {ratio:.1f}x; greedy tokens agree at {100 * agree:.1f}% of positions")
    if args.json:
        payload = {"model": {k: getattr(m, k) for k in ("family", "layers", "d_model", "heads", "vocab_size",
                                                          "max_len", "compute_dtype")},
                   "batch": args.batch, "prompt_lengths": lengths.tolist(), "new_tokens": args.new_tokens,
                   "bucket": args.bucket, "device": device.device_kind, "results": results, "speedup": ratio,
                   "token_agreement": agree}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
