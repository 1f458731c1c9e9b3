"""KV-cache generation against full-sequence recomputation, numpy sampling references and the CLI."""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config as config_lib
from jaxllm import mesh as mesh_lib
from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.errors import UserError
from jaxllm.generate import filter_logits, generate, generate_jit, left_pad, sample_logits
from jaxllm.generate.__main__ import main
from jaxllm.models.decoder import CACHE_AXES, KVCache
from jaxllm.models.definition import ModelDef, init_params

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama", kv_heads=2),  # grouped-query attention: 4 query heads share 2 kv heads
    "bloom": dict(family="bloom", heads=6, d_model=48),  # ALiBi slopes off the power-of-two path
}
PROMPTS = [[5, 17, 9, 33, 2, 61, 40], [42, 8], [70, 3, 3, 96, 1]]


def make(family, **extra):
    """A tiny model with every parameter perturbed, so that logits are far from uniform."""
    cfg = ModelConfig(**(dict(layers=2, d_model=32, heads=4, vocab_size=97, max_len=32) | FAMILIES[family] | extra))
    params = init_params(cfg, 0)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, noisy)
    model_def = ModelDef.from_config(cfg)
    return cfg, model_def, params, model_def.bind(params)


def naive_greedy(model, prompt, steps, stops=()):
    """Recomputes the whole sequence with the training forward for every new token.

    The sequence is right-padded to max_len so that one compilation serves every length; the forward
    is causal, so what follows position len - 1 does not change its logits.
    """
    graphdef, params = nnx.split(model)
    forward = _jitted_forward(graphdef)
    seq, new, logprobs = list(prompt), [], []
    for _ in range(steps):
        padded = np.zeros((1, model.cfg.max_len), np.int32)
        padded[0, : len(seq)] = seq
        logits = np.asarray(forward(params, padded)[0, len(seq) - 1], np.float64)
        token = int(np.argmax(logits))
        logprobs.append(logits[token] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max())
        seq.append(token)
        new.append(token)
        if token in stops:
            break
    return new, logprobs


_FORWARDS = {}


def _jitted_forward(graphdef):
    key = repr(graphdef)
    if key not in _FORWARDS:
        _FORWARDS[key] = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
    return _FORWARDS[key]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_logits_equal_full_forward(family, dtype):
    cfg, _, _, model = make(family, compute_dtype=dtype)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, cfg.vocab_size, 14), rng.integers(0, cfg.vocab_size, 14)]
    lengths = np.asarray([6, 3])
    width, extra = 6, 8
    full = [np.asarray(model(jnp.asarray(r[None])))[0] for r in rows]
    tokens, got_lengths = left_pad([r[:n].tolist() for r, n in zip(rows, lengths, strict=True)])
    np.testing.assert_array_equal(got_lengths, lengths)
    cache = KVCache.init(cfg, 2, width + extra, width - lengths)
    logits, cache = model.decode(jnp.asarray(tokens), cache)
    got = [[np.asarray(logits[b, width - n:])] for b, n in enumerate(lengths)]
    fed = 0
    for chunk in (1, 1, 2, 1, 3):  # a few tokens at a time as well as one
        step = np.stack([r[n + fed: n + fed + chunk] for r, n in zip(rows, lengths, strict=True)])
        logits, cache = model.decode(jnp.asarray(step), cache)
        for b in range(2):
            got[b].append(np.asarray(logits[b]))
        fed += chunk
    assert int(cache.index) == width + fed
    tol = 1e-5 if dtype == "float32" else 2e-2
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.concatenate(got[b]), full[b][: n + fed], rtol=tol, atol=tol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_naive_recompute_batched_and_alone(family):
    _, _, _, model = make(family)
    new, logprobs = generate(model, PROMPTS, max_new_tokens=9, return_logprobs=True)
    for prompt, got, got_lp in zip(PROMPTS, new, logprobs, strict=True):
        want, want_lp = naive_greedy(model, prompt, 9)
        assert got == want
        np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    assert len({t for row in new for t in row}) > 5  # a model whose greedy output is not one repeated token
    assert generate(model, [PROMPTS[1]], max_new_tokens=9) == [new[1]]


def _numpy_filtered_probs(logits, temperature, top_k, top_p):
    """The renormalised sampling distribution, written from the definitions (Hugging Face's order)."""
    z = np.asarray(logits, np.float64) / temperature
    if top_k:
        kth = np.sort(z)[::-1][top_k - 1]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros(p.shape, bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 5, 1.0), (1.0, 0, 0.7), (0.8, 10, 0.9), (1.3, 3, 0.5), (1.0, 1, 1.0)])
def test_filter_logits_equals_numpy_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(5).normal(0, 2, (6, 40)).astype(np.float32)
    got = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits), temperature, top_k, top_p)))
    want = np.stack([_numpy_filtered_probs(row, temperature, top_k, top_p) for row in logits])
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if top_k:
        assert ((got > 0).sum(-1) <= top_k).all()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, 1.0, 0, p))[0])).tolist()
    assert kept(0.45) == [1]  # 0.5 alone reaches 0.45
    assert kept(0.75) == [1, 3]  # 0.5 + 0.3
    assert kept(0.9) == [1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    ties = jnp.asarray([[2.0, 1.0, 1.0, 0.0]])  # top-2 with a tie at the boundary keeps both tied tokens
    assert np.isfinite(np.asarray(filter_logits(ties, 1.0, 2, 1.0))[0]).tolist() == [True, True, True, False]


@pytest.mark.parametrize("temperature, top_k, top_p", [(2.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 0, 0.6)])
def test_seeded_sampling_follows_the_filtered_distribution(temperature, top_k, top_p):
    logits = np.random.default_rng(6).normal(0, 1.5, 8).astype(np.float32)
    draws = 40000
    tokens = sample_logits(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (draws, 8)), temperature,
                           top_k, top_p)
    freq = np.bincount(np.asarray(tokens), minlength=8) / draws
    want = _numpy_filtered_probs(logits, temperature, top_k, top_p)
    assert (freq[want == 0] == 0).all()
    assert (np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / draws) + 1e-9).all(), (freq, want)
    again = sample_logits(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits), (draws, 8)), temperature,
                          top_k, top_p)
    np.testing.assert_array_equal(tokens, again)  # the seed decides


def test_sampling_depends_on_seed_and_greedy_does_not():
    _, _, _, model = make("llama")
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.95)
    a = generate(model, PROMPTS, seed=0, **kwargs)
    assert a == generate(model, PROMPTS, seed=0, **kwargs)
    assert a != generate(model, PROMPTS, seed=1, **kwargs)
    assert generate(model, PROMPTS, max_new_tokens=8, seed=0) == generate(model, PROMPTS, max_new_tokens=8, seed=3)


def test_stop_tokens_end_rows_inclusively_and_pad_the_rest():
    _, _, _, model = make("gpt2")
    free = [naive_greedy(model, p, 10)[0] for p in PROMPTS]
    stop = free[0][3]  # a token row 0 makes at step 3
    want = [naive_greedy(model, p, 10, stops=(stop,))[0] for p in PROMPTS]
    assert want[0][-1] == stop and len(want[0]) <= 4
    assert generate(model, PROMPTS, max_new_tokens=10, stop_tokens=(stop, 96)) == [
        naive_greedy(model, p, 10, stops=(stop, 96))[0] for p in PROMPTS]

    tokens, lengths = left_pad(PROMPTS, pad_id=0)
    graphdef, params = nnx.split(model)
    out = generate_jit(graphdef, params, tokens, lengths, jax.random.key(0), max_new_tokens=10,
                       stop_tokens=(stop,), pad_id=-1)
    assert out.tokens.shape == (3, 10) and out.logprobs.shape == (3, 10)
    np.testing.assert_array_equal(out.lengths, [len(w) for w in want])
    for row, w in zip(np.asarray(out.tokens), want, strict=True):
        assert row[: len(w)].tolist() == w and (row[len(w):] == -1).all()
    for row, w in zip(np.asarray(out.logprobs), want, strict=True):
        assert (row[: len(w)] < 0).all() and (row[len(w):] == 0).all()


@pytest.mark.parametrize("family, tensor", [("llama", 2), ("llama", 4), ("bloom", 2), ("gpt2", 4)])
def test_tensor_parallel_params_give_the_unsharded_tokens(devices, family, tensor):
    cfg, model_def, params, model = make(family)
    want, want_lp = generate(model, PROMPTS, max_new_tokens=8, return_logprobs=True)
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=tensor), devices[:tensor])
    with jax.set_mesh(mesh):
        shardings = mesh_lib.tree_shardings(mesh, model_def.logical_axes, model_def.shapes)
        sharded = jax.device_put(params, shardings)
        wq = sharded["blocks"][0]["attn"]["wq"]
        assert len({str(s.index) for s in wq.addressable_shards}) == tensor  # really split over heads
        got, got_lp = generate(model_def.bind(sharded), PROMPTS, max_new_tokens=8, return_logprobs=True)
        cache = jax.jit(lambda: KVCache.init(cfg, 2, 16).k)()
    assert got == want
    np.testing.assert_allclose(np.concatenate(got_lp), np.concatenate(want_lp), rtol=1e-4, atol=1e-4)
    divides = cfg.num_kv_heads % tensor == 0
    assert cache.sharding.spec == mesh_lib.logical_to_spec(CACHE_AXES, cache.shape, mesh)
    axis = CACHE_AXES.index("kv_heads")
    assert (len(cache.sharding.spec) > axis and cache.sharding.spec[axis] == "tensor") is divides


def test_bad_requests_are_refused():
    cfg, _, _, model = make("gpt2")
    with pytest.raises(UserError, match=r"prompt 1 has 30 tokens; with max_new_tokens=5 that is 35, more than .*32"):
        generate(model, [[1], [2] * 30], max_new_tokens=5)
    with pytest.raises(UserError, match="prompt 0: token id 97 is outside the vocabulary"):
        generate(model, [[97]], max_new_tokens=2)
    with pytest.raises(UserError, match="prompt 1: expected a non-empty list"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(UserError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(UserError, match="temperature"):
        generate(model, [[1]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)


# ---- command line on a tiny trained run -------------------------------------------------------------

WORDS = ("the model reads tokens and writes text while the cache keeps keys and values for every layer "
         "so each step costs one token instead of the whole sequence").split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxllm.train import train

    root = tmp_path_factory.mktemp("gen_run")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(300)) + "\n")
    cfg = config_lib.load(None, [
        "model.layers=2", "model.d_model=32", "model.heads=4", "model.kv_heads=2", "model.family=llama",
        "model.vocab_size=320", "model.max_len=48", "data.source=text", f"data.path={corpus}", "data.seq_len=16",
        "train.batch_size=8", "train.steps=3", "train.warmup_steps=1", "train.lr=3e-2", "eval.every=0",
        "log.progress_bar=false", "log.tensorboard=false", "mesh.data=8"])
    train(cfg, root / "run")
    return root / "run"


def _restored_model(run):
    """The trained params read back as numpy by Orbax's plain PyTree reader, independent of the CLI."""
    import orbax.checkpoint as ocp

    from jaxllm.engine.checkpoint import Checkpointer

    ckpt = Checkpointer(run / "checkpoints")
    cfg = ModelConfig(**ckpt.read_meta(3)["model"])
    ckpt.close()
    reader = ocp.PyTreeCheckpointer()
    path = run / "checkpoints" / "3" / "state"
    saved = reader.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    blocks = state["params"]["blocks"]
    state["params"]["blocks"] = {int(k): v for k, v in blocks.items()}
    return ModelDef.from_config(cfg).bind(jax.tree.map(jnp.asarray, state["params"]))


def test_cli_generates_from_a_training_workdir(workdir, capsys, devices):
    from jaxllm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(workdir / "data" / "tokenizer.model")
    model = _restored_model(workdir)
    prompts = ["the cache keeps", "each step"]
    args = ["--workdir", str(workdir), "--prompt", prompts[0], "--prompt", prompts[1], "--prompt-ids", "7 9 11",
            "--max-new-tokens", "12", "--json"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for record, text in zip(records[:2], prompts, strict=True):
        assert record["prompt_ids"] == tok.encode(text)
        want, want_lp = naive_greedy(model, tok.encode(text), 12, stops=(tok.eos_id,))
        assert record["new_ids"] == want
        assert record["prompt_text"] + record["completion"] == tok.decode(tok.encode(text) + want)
        assert record["logprob"] == pytest.approx(sum(want_lp), rel=1e-4, abs=1e-4)
    assert records[2]["prompt_ids"] == [7, 9, 11]
    assert records[2]["new_ids"] == naive_greedy(model, [7, 9, 11], 12, stops=(tok.eos_id,))[0]

    assert main([*args, "--tensor", "2"]) == 0  # parameters restored straight into tensor-parallel shards
    sharded = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["new_ids"] for r in sharded] == [r["new_ids"] for r in records]
    np.testing.assert_allclose([r["logprob"] for r in sharded], [r["logprob"] for r in records], rtol=1e-5)

    assert main(["--workdir", str(workdir), "--prompt", "the model", "--max-new-tokens", "5", "--temperature",
                 "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "4"]) == 0
    assert capsys.readouterr().out.startswith("the model")


def test_cli_errors_name_the_problem(workdir, tmp_path, capsys):
    bare = tmp_path / "bare"  # a run without a tokenizer, as data.source=synthetic leaves it
    shutil.copytree(workdir / "checkpoints", bare / "checkpoints")
    cases = [
        (["--workdir", str(tmp_path / "absent"), "--prompt-ids", "1"], "--workdir .*absent: directory not found"),
        (["--workdir", str(tmp_path), "--prompt-ids", "1"], "no checkpoint in .*checkpoints; train first"),
        (["--workdir", str(workdir), "--prompt", "the " * 40, "--max-new-tokens", "20"],
         r"prompt 0 has \d+ tokens; with max_new_tokens=20 .* max_len=48"),
        (["--workdir", str(workdir), "--prompt-ids", "1 x"], "--prompt-ids '1 x': expected integers"),
        (["--workdir", str(workdir), "--step", "2", "--prompt-ids", "1"], r"--step 2: no such checkpoint .*\[3\]"),
        (["--workdir", str(workdir)], "no prompt"),
        (["--workdir", str(bare), "--prompt", "the"], "--prompt needs a tokenizer and none was found"),
        (["--workdir", str(workdir), "--prompt-ids", "1", "--top-p", "1.5"], "top_p: got 1.5"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        assert re.search(message, err), err


def test_cli_generates_from_a_hugging_face_directory(tmp_path, capsys, devices):
    hf = pytest.importorskip("jaxllm.interop.hf")
    cfg, _, _, model = make("bloom")
    hf.save(model, cfg, tmp_path / "hf")
    want = [naive_greedy(model, p, 6)[0] for p in PROMPTS[:2]]
    args = ["--hf", str(tmp_path / "hf"), "--max-new-tokens", "6", "--json"]
    args += [f"--prompt-ids={' '.join(map(str, p))}" for p in PROMPTS[:2]]
    for tensor in ("1", "2"):
        assert main([*args, "--tensor", tensor]) == 0
        assert [json.loads(line)["new_ids"] for line in capsys.readouterr().out.splitlines()] == want
    assert main(["--hf", str(tmp_path / "absent"), "--prompt-ids", "1"]) == 2
    assert "--hf" in capsys.readouterr().err


def test_compressed_workdir_generates_as_docs_compression_prints(workdir, tmp_path, monkeypatch, capsys, devices):
    """docs/compression.md's command lines (ptq, lkd, xtc, eval, generate), run as printed from a directory
    of their own (the teacher is the module's trained run, copied to runs/qs; the recipe and appended flags
    shrink the work)."""
    import shlex

    import yaml

    from jaxllm.compression.__main__ import main as compress_main
    from jaxllm.data.tokenizer import Tokenizer
    from tests.conftest import REPO

    text = (REPO / "docs" / "compression.md").read_text()
    block = text[text.index("## Commands"):].split("```bash\n", 1)[1].split("```", 1)[0]
    every = [shlex.split(line, comments=True) for line in block.splitlines() if "jaxllm.compress" in line]
    distilling = [argv for argv in every if argv[3] in ("lkd", "xtc")]
    evaluating = next(argv for argv in every if argv[3] == "eval")
    assert [argv[3] for argv in distilling] == ["lkd", "xtc"]
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if "runs/qs-w8a8" in line]
    ptq = next(argv for argv in lines if argv[2:4] == ["jaxllm.compress", "ptq"])
    generating = [argv for argv in lines if argv[2] == "jaxllm.generate" or argv[3] == "generate"]
    assert [argv[2] for argv in generating] == ["jaxllm.compress", "jaxllm.generate"]

    shutil.copytree(workdir, tmp_path / "runs" / "qs")
    corpus = workdir.parent / "corpus.txt"  # the teacher's data, so its tokenized shards are reused
    recipe = {"data": {"source": "text", "path": str(corpus), "seq_len": 16}, "train": {"batch_size": 8, "steps": 2},
              "eval": {"batches": 1}, "log": {"progress_bar": False, "tensorboard": False},
              "compression": {"rules": {"all": {"modules": [r"attn\.w[qkvo]", "mlp"], "weight_bits": 8,
                                                "act_bits": 8}},
                              "lkd": {"steps": 2, "batches": 1}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    assert compress_main(ptq[3:]) == 0
    for argv in [*distilling, evaluating]:
        assert compress_main(argv[3:]) == 0, capsys.readouterr().err
    assert (tmp_path / "runs" / "qs-w48a8-lkd" / "checkpoints").is_dir() and (tmp_path / "runs" / "qs-xtc").is_dir()
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["eval_loss"] > 0
    assert evaluated["eval_perplexity"] == pytest.approx(math.exp(evaluated["eval_loss"]), rel=1e-5)
    records = []
    for argv in generating:
        run = compress_main if argv[2] == "jaxllm.compress" else main
        assert run([*argv[3:], "--max-new-tokens", "4", "--json"]) == 0, capsys.readouterr().err
        (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        records.append(record)
    tok = Tokenizer.load(workdir / "data" / "tokenizer.model")
    assert records[0]["prompt_ids"] == tok.encode("The") and records[0]["prompt_text"] == "The"
    assert records[0]["completion"] == tok.decode(records[0]["prompt_ids"] + records[0]["new_ids"])[3:]
    assert records[1] == records[0]
