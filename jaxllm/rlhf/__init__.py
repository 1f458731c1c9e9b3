"""DeepSpeed-Chat's RLHF pipeline in JAX: supervised fine-tuning, a reward model, PPO.

Commands: ``python -m jaxllm.rlhf sft|reward|ppo --config=...`` (see `jaxllm.rlhf.__main__` and
docs/rlhf.md). Modules: `config` (the YAML schema), `data` (JSONL rows, `data_split`, token rows),
`models` (value head on the decoder), `lora`, `losses` (the objectives, pure functions), `sft`,
`reward`, `ppo` + `ppo_step` (the three steps), `loop` and `common` (what the steps share),
`evaluate` (reading a policy back, answers, KL), `synthetic` (a rule-checkable preference task).
"""
