"""`python -m jaxllm.compress`: a compressed checkpoint reloads, evaluates and generates; bad input fails clearly."""

import json

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxllm import config as config_lib
from jaxllm.compression import checkpoint, pipeline
from jaxllm.compression.__main__ import main as compress_main
from jaxllm.compression.qtensor import QuantizedWeight
from jaxllm.config import ModelConfig
from jaxllm.data.pipeline import SyntheticRows, make_train_iterator
from jaxllm.engine.checkpoint import Checkpointer, run_meta
from jaxllm.errors import UserError
from jaxllm.generate import generate
from jaxllm.generate.__main__ import main as generate_main
from jaxllm.models.definition import ModelDef, init_params

CONFIG = {
    "model": {"layers": 2, "d_model": 32, "heads": 4, "vocab_size": 64, "max_len": 32},
    "data": {"seq_len": 32, "synthetic_rows": 128, "eval_fraction": 0.25},
    "train": {"steps": 8, "batch_size": 8, "log_every": 4},
    "eval": {"every": 0, "batches": 2},
    "log": {"tensorboard": False, "progress_bar": False},
    "compression": {"rules": {
        "attn": {"modules": [r"attn\.w[qkvo]"], "weight_bits": 8, "weight_groups": 4, "act_bits": 8},
        "mlp": {"modules": ["mlp.c_fc", "mlp.c_proj"], "weight_bits": 4, "weight_groups": 8, "act_bits": 8,
                "act_range": "static"},
        "embedding": {"modules": ["wte"], "weight_bits": 8}}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A teacher workdir as `python -m jaxllm.train` writes it (perturbed initial weights, no training steps)."""
    root = tmp_path_factory.mktemp("compress")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    config = config_lib.load(path)
    params = init_params(config.model, 0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys, strict=True)])
    rows = SyntheticRows(64, 32, 128, seed=0)
    ckpt = Checkpointer(root / "teacher" / "checkpoints", async_save=False)
    ckpt.save(8, {"step": 8, "skipped_steps": 0, "params": params}, make_train_iterator(rows, 8, 0),
              run_meta(config.model))
    ckpt.close()
    return root, path


def test_ptq_checkpoint_reloads_evaluates_and_generates(run, capsys):
    root, path = run
    out = root / "w4a8"
    assert compress_main(["ptq", "--config", str(path), "--teacher", str(root / "teacher"), "--workdir", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["modules"] == 13 and summary["weight_bytes"] < 0.3 * summary["teacher_weight_bytes"]

    model, step = checkpoint.load_workdir(out)
    assert step == 8
    wq = model.blocks[0].attn.wq[...]
    assert isinstance(wq, QuantizedWeight) and wq.codes.dtype == np.int8 and wq.codes.shape == (32, 32)
    w_in = model.blocks[0].mlp.w_in[...]
    assert w_in.codes.shape == (16, 128) and w_in.act_range is not None  # int4: two codes per byte

    # The same compression in memory gives the same model, logits and tokens.
    teacher = pipeline.load_teacher(root / "teacher")
    config = config_lib.load(path)
    rules, _ = pipeline.compression_rules(config)
    from jaxllm.compression import rules as rules_lib
    from jaxllm.compression import zeroquant

    cfg = teacher.model_def.bind(teacher.params).cfg
    specs = rules_lib.plan(cfg, rules, rules_lib.module_shapes(teacher.model_def.shapes, cfg))
    data = pipeline.Data(config, root / "teacher")
    tree, _ = zeroquant.ptq(teacher.model_def, teacher.params, specs, data.train_batches(4))
    x = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
    forward = jax.jit(lambda tree: teacher.model_def.bind(tree)(x))
    np.testing.assert_array_equal(forward(nnx.split(model)[1]), forward(tree))
    prompts = [[1, 2, 3], [7, 8]]
    new = generate(model, prompts, max_new_tokens=6)
    assert new == generate(teacher.model_def.bind(tree), prompts, max_new_tokens=6)

    assert compress_main(["eval", "--config", str(path), "--workdir", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["eval_loss"] == pytest.approx(summary["eval"]["eval_loss"], rel=1e-6)
    assert compress_main(["generate", "--workdir", str(out), "--prompt-ids", "1 2 3", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in [1, 2, 3] + new[0]]
    # The general generation command recognises a compressed workdir too.
    assert generate_main(["--workdir", str(out), "--prompt-ids", "1 2 3", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in [1, 2, 3] + new[0]]


def test_cli_errors(run, capsys):
    root, path = run
    teacher = root / "teacher"
    # The output directory must be new.
    assert compress_main(["ptq", "--config", str(path), "--teacher", str(teacher), "--workdir", str(teacher)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert compress_main(["ptq", "--config", str(path), "--workdir", str(root / "x"),
                          "compression.rules.attn.weight_bits=9"]) == 2
    assert "'compression.rules.attn.weight_bits': got 9" in capsys.readouterr().err
    # Layer reduction needs training.
    reduce = ["compression.layer_reduction.enabled=true", "compression.layer_reduction.teacher_layer=[1]"]
    assert compress_main(["ptq", "--config", str(path), "--teacher", str(teacher), "--workdir", str(root / "y"),
                          *reduce]) == 2
    assert "layer reduction needs training; use the xtc" in capsys.readouterr().err

    config = config_lib.load(path, ["compression.rules.typo.modules=[self_attn.q_proj]",
                                    "compression.rules.typo.weight_bits=8"])
    loaded = pipeline.load_teacher(teacher)
    with pytest.warns(UserWarning, match=r"match no module: 'compression.rules.typo' \('self_attn.q_proj'\)"):
        summary = pipeline.compress("ptq", config, loaded, root / "typo", log=lambda _: None)
    assert summary["modules"] == 13  # the other rules still apply
    other = ModelConfig(layers=2, d_model=48, heads=4, vocab_size=64, max_len=32)
    student = pipeline.Teacher(ModelDef.from_config(other), init_params(other, 0), 0, teacher)
    with pytest.raises(UserError, match="incompatible shapes \\(model.d_model: teacher 32, student 48\\)"):
        pipeline.compress("xtc", config_lib.load(path), loaded, root / "z", student=student)
