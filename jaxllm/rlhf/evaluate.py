"""Reading a trained policy back and measuring it: answers to prompts, rule scores, KL to a reference.

`load_policy(workdir, mesh)` reads the actor of a step-1 (or `jaxllm.train`) workdir, or of a step-3
workdir (LoRA fused; `ema=True` for the EMA copy). `answer(...)` generates for `PromptRows`, greedily
or sampled, and `sequence_logprobs` scores given answers under any policy, so
`mean(sum log pi(y) - sum log pi_ref(y))` over `y ~ pi` is a Monte Carlo estimate of KL(pi || pi_ref).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.data.tokenizer import TextTokenizer, load_tokenizer, workdir_tokenizer_file
from jaxllm.engine.checkpoint import Checkpointer, saved_steps
from jaxllm.engine.state import ParamTree
from jaxllm.errors import UserError
from jaxllm.generate import generate_tokens
from jaxllm.models.definition import ModelDef
from jaxllm.rlhf import common, lora
from jaxllm.rlhf.data import PromptRows, special_ids
from jaxllm.rlhf.models import actor_def, sequence_inputs
from jaxllm.rlhf.ppo_step import answer_logprobs


@dataclasses.dataclass
class Policy:
    model_def: ModelDef
    params: Any
    tokenizer: TextTokenizer
    stage: str
    step: int


def load_policy(workdir: str | Path, mesh, ema: bool = False) -> Policy:
    """The actor of a workdir's latest checkpoint, with plain (LoRA-fused) parameters on `mesh`."""
    workdir = Path(workdir)
    tokenizer_file = workdir_tokenizer_file(workdir)
    if tokenizer_file is None:
        raise UserError(f"workdir '{workdir}' has no tokenizer in data/")
    tokenizer = load_tokenizer(tokenizer_file)
    directory = workdir / "checkpoints"
    step = (saved_steps(directory) or [None])[-1]
    if step is None:
        raise UserError(f"workdir '{workdir}' has no checkpoint")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        meta = ckpt.read_meta(step)
        stage = meta.get("rlhf", {}).get("stage", "pre-training")
        if stage != "ppo":
            source = common.load_source(workdir, "workdir", "decoder", mesh, 3, ModelConfig(), step)
            return Policy(actor_def(source.model, tokenizer.vocab_size), source.params, tokenizer, stage, step)
        cfg = common.model_from_meta(meta["model"], ModelConfig(), f"workdir '{workdir}'")
        model_def = actor_def(cfg, tokenizer.vocab_size)
        structure = meta["rlhf"]["structure"]
        if ema and not structure["enable_ema"]:
            raise UserError(f"workdir '{workdir}' was trained without ppo.enable_ema; it has no EMA actor")
        dim = structure["actor_lora_dim"]
        axes, shapes = model_def.logical_axes, model_def.shapes
        if dim:
            l_axes, l_shapes = lora.lora_layout(axes, shapes, structure["lora_module_name"], dim)
            axes, shapes = {"base": axes, "lora": l_axes}, {"base": shapes, "lora": l_shapes}
        tree = ParamTree(axes, shapes).placed(mesh)
        restored = ckpt.restore_part(step, {"actor_ema": tree} if ema else {"actor": {"params": tree}})
    finally:
        ckpt.close()
    params = restored["actor_ema"] if ema else restored["actor"]["params"]
    if dim:
        params = lora.merge(params, structure["lora_scaling"] / dim)
    return Policy(model_def, params, tokenizer, stage, step)


def answer(policy: Policy, prompts: PromptRows, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
           batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [n, max_new_tokens], lengths [n], log-probs [n, max_new_tokens]) for every prompt."""
    eos, pad = special_ids(policy.tokenizer)

    @jax.jit
    def run(params, prompt, length, key):
        return generate_tokens(policy.model_def.bind(params), prompt, length, key, max_new_tokens=max_new_tokens,
                               temperature=temperature, stop_tokens=(eos,), pad_id=pad)

    outs = []
    for i in range(0, len(prompts), batch):
        idx = np.arange(i, i + batch) % len(prompts)  # a full last batch: one compilation
        out = run(policy.params, prompts.prompt[idx], prompts.prompt_length[idx], jax.random.key(seed + i))
        outs.append([np.asarray(x)[: min(batch, len(prompts) - i)] for x in jax.device_get(out)])
    return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))  # type: ignore[return-value]


def sequence_logprobs(policy: Policy, prompts: PromptRows, tokens: np.ndarray, lengths: np.ndarray,
                      batch: int = 64) -> np.ndarray:
    """[n] sum over each answer's tokens of log pi(token | prefix) under `policy`."""
    width = prompts.prompt.shape[1]

    @jax.jit
    def run(params, prompt, prompt_length, answers, answer_length):
        seq = jnp.concatenate([prompt, answers], axis=1)
        positions, segment_ids = sequence_inputs(prompt_length, answer_length, width, seq.shape[1])
        logp = answer_logprobs(policy.model_def, params, seq, positions, segment_ids, width)
        mask = jnp.arange(answers.shape[1])[None, :] < answer_length[:, None]
        return jnp.sum(logp * mask, axis=1)

    out = []
    for i in range(0, len(prompts), batch):
        idx = np.arange(i, i + batch) % len(prompts)
        got = run(policy.params, prompts.prompt[idx], prompts.prompt_length[idx], tokens[idx], lengths[idx])
        out.append(np.asarray(got)[: min(batch, len(prompts) - i)])
    return np.concatenate(out)


def decode_answers(tokenizer: TextTokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    return [tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths, strict=True)]
