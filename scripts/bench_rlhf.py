"""The synthetic RLHF demo end to end, with the numbers that show it works.

    python scripts/bench_rlhf.py [--workdir runs/rlhf] [--no-generate-bench] [--json out.json]

Runs (or resumes; a finished step is a no-op) the three commands with `configs/rlhf/*.yaml`:

    python -m jaxllm.rlhf sft    --config configs/rlhf/sft.yaml    --workdir WORKDIR/sft
    python -m jaxllm.rlhf reward --config configs/rlhf/reward.yaml --workdir WORKDIR/reward
    python -m jaxllm.rlhf ppo    --config configs/rlhf/ppo.yaml    --workdir WORKDIR/ppo

then prints:

- the reward model's accuracy on the held-out pairs (the last `reward_accuracy` it logged);
- the rule score (`jaxllm.rlhf.synthetic.rule_score`) of the SFT and the PPO actor on the held-out
  step-3 prompts, greedy and sampled (temperature 1), and KL(PPO || SFT) estimated on the PPO actor's
  sampled answers as mean(log pi_ppo(y) - log pi_sft(y)) in nats per answer;
- PPO's wall-clock split between generation, scoring and training (mean of the logged rows after
  the first, which includes compilation);
- the KV-cache generation speed-up over recomputing the sequence for every token, measured by
  `scripts/bench_generate.py` on the actor's architecture and the demo's batch and lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage: str, workdir: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "jaxllm.rlhf", stage, f"--config={REPO / 'configs/rlhf' / f'{stage}.yaml'}",
           f"--workdir={workdir / stage}", "log.progress_bar=false", *extra]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(workdir: Path) -> dict:
    import jax

    from jaxllm import mesh as mesh_lib
    from jaxllm.config import MeshConfig
    from jaxllm.rlhf import config as config_lib
    from jaxllm.rlhf.common import load_records, stage_split
    from jaxllm.rlhf.data import PromptRows
    from jaxllm.rlhf.evaluate import answer, decode_answers, load_policy, sequence_logprobs
    from jaxllm.rlhf.synthetic import rule_score

    config = config_lib.load(REPO / "configs/rlhf/ppo.yaml")
    mesh = mesh_lib.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        sft = load_policy(workdir / "sft", mesh)
        ppo = load_policy(workdir / "ppo", mesh)
        records, eval_records = load_records(config, workdir / "ppo")
        _, held_out = stage_split(config, records, eval_records, "ppo")
        prompts = PromptRows(held_out, ppo.tokenizer, config.data.max_prompt_seq_len)
        texts = [r.prompt for r in prompts.records]
        answer_len = config.ppo.max_answer_seq_len
        out: dict = {"prompts": len(prompts)}
        samples = {}
        for name, policy in (("sft", sft), ("ppo", ppo)):
            for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
                tokens, lengths, _ = answer(policy, prompts, answer_len, temperature, seed=1)
                answers = decode_answers(policy.tokenizer, tokens, lengths)
                out[f"{name}_{mode}_score"] = float(np.mean([rule_score(p, a) for p, a in zip(texts, answers,
                                                                                              strict=True)]))
                out[f"{name}_{mode}_examples"] = [f"{p} -> {a}" for p, a in list(zip(texts, answers, strict=True))[:3]]
                samples[name, mode] = tokens, lengths
        tokens, lengths = samples["ppo", "sampled"]
        kl = sequence_logprobs(ppo, prompts, tokens, lengths) - sequence_logprobs(sft, prompts, tokens, lengths)
        out["kl_ppo_sft"] = float(np.mean(kl))
    return out


def generate_bench(workdir: Path) -> dict | None:
    from jaxllm.rlhf import config as config_lib

    meta_model = json.loads((workdir / "sft" / "checkpoints").joinpath(
        max((p.name for p in (workdir / "sft" / "checkpoints").iterdir() if p.name.isdigit()), key=int),
        "meta", "metadata").read_text())["model"]
    config = config_lib.load(REPO / "configs/rlhf/ppo.yaml")
    keys = ("family", "layers", "d_model", "heads", "vocab_size", "max_len")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gen.json"
        cmd = [sys.executable, str(REPO / "scripts/bench_generate.py"), "--batch",
               str(config.ppo.generation_batch_size), "--prompt-len", str(config.data.max_prompt_seq_len),
               "--new-tokens", str(config.ppo.max_answer_seq_len), "--bucket", "2", "--repeats", "3",
               "--json", str(out), f"data.seq_len={config.data.max_seq_len}",
               *[f"model.{k}={meta_model[k]}" for k in keys]]
        print("$ python " + " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
        print(done.stdout.strip())
        if done.returncode != 0:
            print(done.stderr.strip()[-2000:])
            return None
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "runs/rlhf"))
    parser.add_argument("--no-generate-bench", action="store_true", help="skip scripts/bench_generate.py")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    seconds = {
        "sft": run_stage("sft", workdir, []),
        "reward": run_stage("reward", workdir, [f"reward.init_workdir={workdir / 'sft'}"]),
        "ppo": run_stage("ppo", workdir, [f"ppo.actor_workdir={workdir / 'sft'}",
                                          f"ppo.critic_workdir={workdir / 'reward'}"]),
    }
    reward_rows = [r for r in rows(workdir / "reward" / "metrics.jsonl") if "reward_accuracy" in r]
    ppo_rows = [r for r in rows(workdir / "ppo" / "metrics.jsonl") if "reward_mean" in r]
    result = {"stage_seconds": seconds, "reward_accuracy": reward_rows[-1]["reward_accuracy"],
              "reward_eval_pairs": reward_rows[-1].get("eval_pairs"), **evaluate(workdir)}
    steady = ppo_rows[1:] or ppo_rows
    split = {k: float(np.mean([r[k] for r in steady])) for k in ("generation_time", "scoring_time", "training_time")}
    result["ppo_time_split"] = split
    result["ppo_first_row"] = {k: ppo_rows[0][k] for k in ("step", "reward_mean", "kl")}
    result["ppo_last_row"] = {k: ppo_rows[-1][k] for k in ("step", "reward_mean", "kl")}
    if not args.no_generate_bench:
        result["generate_bench"] = generate_bench(workdir)

    print()
    print("step seconds (this run; a finished step resumes as a no-op): "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"reward model held-out accuracy: {100 * result['reward_accuracy']:.1f}% "
          f"({result['reward_eval_pairs']} pairs)")
    print(f"rule score on {result['prompts']} held-out prompts:   greedy    sampled")
    for name in ("sft", "ppo"):
        greedy, sampled = result[f"{name}_greedy_score"], result[f"{name}_sampled_score"]
        print(f"  {name.upper():>4} actor {'':24}{greedy:7.3f}  {sampled:9.3f}")
    print(f"KL(PPO || SFT) on PPO's sampled answers: {result['kl_ppo_sft']:.3f} nats per answer")
    print(f"PPO training log: reward_mean {result['ppo_first_row']['reward_mean']:.3f} -> "
          f"{result['ppo_last_row']['reward_mean']:.3f}, kl {result['ppo_first_row']['kl']:.3f} -> "
          f"{result['ppo_last_row']['kl']:.3f}")
    total = sum(split.values())
    print("PPO time per round (steady state): " + ", ".join(
        f"{k.replace('_time', '')} {1000 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in split.items()))
    for name in ("sft", "ppo"):
        print(f"  {name.upper()} greedy examples: " + " | ".join(result[f"{name}_greedy_examples"]))
    gen = result.get("generate_bench")
    if gen:
        cache, recompute = gen["results"]["cache"], gen["results"]["recompute"]
        print(f"KV-cache generation vs recomputation (scripts/bench_generate.py, batch {gen['batch']}, "
              f"{gen['new_tokens']} new tokens): {cache['tokens_per_sec']:.0f} vs {recompute['tokens_per_sec']:.0f} "
              f"tokens/s, {gen['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
