"""VisualChat end to end: cached MMCA generation against full recomputation, a short train + resume, chat."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.decoder import KVCache
from jaxllm.multimodal import chat
from jaxllm.multimodal import train as train_lib
from jaxllm.multimodal.config import MultimodalConfig, VisionConfig, from_dict
from jaxllm.multimodal.model import VisualChat

VISION = VisionConfig(image_size=8, patch_size=4, d_model=16, layers=1, heads=2, d_ff=32)


@pytest.mark.parametrize("family,attention", [("gpt2", "mmca"), ("llama", "mmca"), ("bloom", "causal")])
def test_cached_decoding_equals_the_full_forward(family, attention):
    """Left-padded prefill plus two cached steps give the logits of `VisualChat.__call__` on each whole row."""
    extra = {"llama": dict(kv_heads=1)}.get(family, {})
    cfg = ModelConfig(family=family, layers=2, d_model=16, heads=2, vocab_size=40, max_len=48, **extra)
    model = VisualChat(cfg, VISION, MultimodalConfig(attention=attention), rngs=nnx.Rngs(params=1))
    t = VISION.tokens
    rows = [[1, 1] + [2] * t + [1] * 3 + [2] * t + [1] * 2, [1] + [2] * t + [1] * 4]  # two images; one image
    width = max(map(len, rows))
    rng = np.random.default_rng(0)
    types = np.zeros((2, width), np.int32)
    tokens = np.zeros((2, width), np.int32)
    for b, row in enumerate(rows):
        types[b, width - len(row):] = row
        tokens[b, width - len(row):] = np.where(np.asarray(row) == 1, rng.integers(4, 40, len(row)), 0)
    images = rng.normal(size=(2, 2, 8, 8, 3)).astype(np.float32)
    new = rng.integers(4, 40, (2, 2))
    slot_types = jnp.asarray(np.concatenate([types, np.ones((2, 2), np.int32)], axis=1))
    start = jnp.asarray(width - np.asarray(list(map(len, rows))), jnp.int32)

    @jax.jit
    def cached(tokens, types, images, new):
        cache = KVCache.init(cfg, 2, width + 2, start)
        prefill, cache = model.decode(tokens, types, images, cache, slot_types)
        steps = []
        for i in range(2):
            logits, cache = model.decode(new[:, i:i + 1], jnp.ones((2, 1), jnp.int32), None, cache, slot_types)
            steps.append(logits[:, 0])
        return prefill, steps

    prefill, steps = cached(tokens, types, images, new)
    full_forward = jax.jit(model.__call__)
    for b, row in enumerate(rows):
        n = len(row)
        full_tokens = np.concatenate([tokens[b, width - n:], new[b]])[None]
        full_types = np.asarray(row + [1, 1])[None]
        full = np.asarray(full_forward(full_tokens, full_types, images[b:b + 1]))[0]
        real = np.asarray(row) == 1
        np.testing.assert_allclose(np.asarray(prefill[b, width - n:])[real], full[:n][real], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(steps[0][b]), full[n], atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(steps[1][b]), full[n + 1], atol=2e-5, rtol=1e-4)


def tiny_config(**train):
    return {
        "model": {"family": "gpt2", "layers": 1, "d_model": 32, "heads": 2, "vocab_size": 320, "max_len": 112},
        "vision": {"image_size": 16, "patch_size": 8, "d_model": 16, "layers": 1, "heads": 2, "d_ff": 32},
        "multimodal": {"train_decoder": True},
        "data": {"max_seq_len": 96, "max_images": 2},
        "synthetic": {"single_rows": 24, "pair_rows": 24, "eval_rows": 4},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1} | train,
        "eval": {"max_new_tokens": 3},
        "checkpoint": {"every": 2, "keep": 3, "async_save": False},
        "log": {"progress_bar": False, "tensorboard": False},
    }


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_and_chat(tmp_path, devices, capsys, monkeypatch):
    """docs/visualchat.md's train and chat commands as printed (relative paths, from a directory holding
    configs/visualchat/tiny.yaml, here a shrunk one), then resume, the optimizer state offloaded, and a
    refused vision shape."""
    import yaml

    (tmp_path / "configs" / "visualchat").mkdir(parents=True)
    (tmp_path / "configs" / "visualchat" / "tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
    monkeypatch.chdir(tmp_path)
    assert train_lib.main(["--config=configs/visualchat/tiny.yaml", "--workdir", "runs/visualchat"]) == 0
    workdir = tmp_path / "runs" / "visualchat"
    config = from_dict(tiny_config())
    last = rows(workdir)[-1]
    first = rows(workdir)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert np.isfinite(last["eval_loss"]) and 0.0 <= last["eval_accuracy"] <= 1.0
    assert {"eval_accuracy/single_count", "eval_accuracy/pair_more"} <= set(last)
    assert all(k in first[0] for k in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"))
    answers = [json.loads(line) for line in (workdir / "eval_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and {"answer", "reference", "correct"} <= set(answers[0])

    # A run killed after its step-2 checkpoint resumes from it and repeats steps 3-4 exactly.
    shutil.rmtree(workdir / "checkpoints" / "4")
    train_lib.train(config, workdir)
    again = rows(workdir)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(first[2:], again[2:], strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a.get("eval_loss") == b.get("eval_loss")

    # The optimizer state in host memory (`mesh.offload=optimizer`): the same steps, bit for bit.
    offloaded = tmp_path / "runs" / "offloaded"
    train_lib.train(from_dict(tiny_config() | {"mesh": {"offload": "optimizer"}}), offloaded)
    for a, b in zip(first, rows(offloaded), strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a.get("eval_loss") == b.get("eval_loss")

    # A different vision shape may not resume from this workdir.
    bad = from_dict(tiny_config() | {"vision": tiny_config()["vision"] | {"d_ff": 64}})
    with pytest.raises(Exception, match="vision.d_ff: checkpoint 32, config 64"):
        train_lib.train(bad, workdir)

    # Without a progress bar (this config) the rows went to the console as lines.
    assert "step 4/4 | loss " in capsys.readouterr().out

    # Chat: two rounds over two images, greedy, from the trained workdir, as the docs print it.
    code = chat.main(["--workdir", "runs/visualchat", "--image", "runs/visualchat/data/synthetic/images/ep0_a.png",
                      "--image", "runs/visualchat/data/synthetic/images/ep0_b.png",
                      "--question", "<image>\n<image>\nWhich image has more circles?",
                      "--question", "How many red shapes are there?", "--max-new-tokens", "3", "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [r["round"] for r in out] == [1, 2] and all(isinstance(r["answer"], str) for r in out)


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    assert train_lib.main(["--workdir", str(tmp_path), "model.layerz=2"]) == 2
    assert "unknown config key 'model.layerz'; did you mean 'model.layers'?" in capsys.readouterr().err
    assert train_lib.main(["--workdir", str(tmp_path), "data.max_images=9"]) == 2
    assert "config key 'data.max_images': got 9; expected an integer in [1, 8]" in capsys.readouterr().err
    assert train_lib.main(["--workdir", str(tmp_path), "optimizer.name=sgd"]) == 2
    assert "optimizer.name" in capsys.readouterr().err
    assert chat.main(["--workdir", str(tmp_path), "--question", "hi"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_text_embedding_starts_as_a_copy_and_only_trainable_groups_change(devices):
    config = from_dict(tiny_config(warmup_steps=0))
    model, vision = config.model, config.vision
    from jaxllm.engine import optimizer
    from jaxllm.engine.state import initial_state
    from jaxllm.engine.step import make_train_step
    from jaxllm.multimodal.model import model_def

    mdef = model_def(model, vision, config.multimodal)
    mesh = jax.sharding.Mesh(np.asarray(devices[:2]).reshape(2, 1, 1, 1), ("data", "fsdp", "tensor", "sequence"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
    frozen = tuple(k for k in mdef.shapes if k not in MultimodalConfig().trainable())  # the default groups
    with jax.set_mesh(mesh):
        opt = optimizer.build(config, mesh, mdef, frozen)
        layout = opt.layout(mesh, mdef, 3, frozen)
        state = initial_state(layout, opt.tx, train_lib.initial_params(config, model, vision, layout))
    assert sorted(layout.state["params"]) == ["projection", "text_embed"] and layout.frozen == ("decoder", "vision")
    np.testing.assert_array_equal(np.asarray(state["params"]["text_embed"]),
                                  np.asarray(state["frozen"]["decoder"]["embed"]))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(4, 300, (8, 96)), "targets": rng.integers(4, 300, (8, 96)),
             "token_types": np.ones((8, 96), np.int64), "positions": np.tile(np.arange(96), (8, 1)),
             "loss_mask": np.ones((8, 96), np.float32), "images": np.zeros((8, 2, 16, 16, 3), np.float32)}
    batch["token_types"][:, 3:3 + vision.tokens] = 2
    before = jax.device_get(state)
    with jax.set_mesh(mesh):
        step = make_train_step(functools.partial(train_lib.loss_sums, mdef), opt, layout)
        state, _ = step(state, {k: jnp.asarray(v, jnp.float32 if v.dtype.kind == "f" else jnp.int32)
                                for k, v in batch.items()})
    after = jax.device_get(state)
    assert jax.tree.all(jax.tree.map(np.array_equal, before["frozen"], after["frozen"]))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["params"], after["params"])
    assert all(jax.tree.leaves(changed))
