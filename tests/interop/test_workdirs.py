"""docs/interop.md's path from a corpus to a Hugging Face directory and back, run as printed: each
command needs only the directory the previous one wrote (the tokenizer travels with the workdir and
the export)."""

import importlib
import io
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from jaxllm.data.tokenizer import Tokenizer
from tests.conftest import REPO
from tests.data.conftest import make_sentences

pytestmark = pytest.mark.slow  # about 25 s with a warm compile cache, 80 s cold, on 2 shared cores

SECTION = "## A workdir and an export carry their tokenizer"
MODULES = {"jaxllm.data.prepare": "jaxllm.data.prepare", "jaxllm.train": "jaxllm.train",
           "jaxllm.generate": "jaxllm.generate.__main__", "jaxllm.interop.convert": "jaxllm.interop.convert"}
TRAIN = ["model.layers=2", "model.d_model=32", "model.heads=4", "model.vocab_size=448", "model.max_len=32",
         "data.seq_len=16", "train.batch_size=8", "train.steps=3", "train.warmup_steps=1", "train.log_every=1",
         "eval.every=0", "log.progress_bar=false", "log.tensorboard=false"]
SHRINK = {"jaxllm.data.prepare": ["--vocab-size", "400"], "jaxllm.train": TRAIN,
          "jaxllm.generate": ["--max-new-tokens", "6", "--json"], "to-hf": [], "from-hf": TRAIN}


def documented_commands() -> list[str]:
    text = (REPO / "docs" / "interop.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def run_command(line: str) -> tuple[int, str, str]:
    """Runs one `python -m ...` line in this process, with the test's shrinking arguments appended."""
    argv = shlex.split(line)
    assert argv[:2] == ["python", "-m"], line
    module = importlib.import_module(MODULES[argv[2]])
    extra = SHRINK[argv[3] if argv[2] == "jaxllm.interop.convert" else argv[2]]
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = module.main([*argv[3:], *extra])
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def path_run(tmp_path_factory, devices):
    """The commands of docs/interop.md's section, run from a directory holding only `corpus.txt`;
    returns that directory and each command's stdout."""
    base = tmp_path_factory.mktemp("workdirs")
    (base / "corpus.txt").write_text("\n\n\n".join(make_sentences(400, seed=3)) + "\n")
    outputs = []
    here = Path.cwd()
    os.chdir(base)
    try:
        for line in documented_commands():
            code, out, err = run_command(line)
            assert code == 0, f"{line}: {err}"
            outputs.append(out)
    finally:
        os.chdir(here)
    return base, outputs


def generated(output: str) -> dict:
    (record,) = [json.loads(line) for line in output.splitlines()]
    return record


def test_the_documented_path_generates_from_the_workdir_and_the_export(path_run):
    base, outputs = path_run
    shards_tokenizer = base / "data" / "mine" / "tokenizer.model"
    assert (base / "runs" / "mine" / "data" / "tokenizer.model").read_bytes() == shards_tokenizer.read_bytes()
    tok = Tokenizer.load(shards_tokenizer)
    from_workdir, from_export = generated(outputs[2]), generated(outputs[4])
    assert from_workdir["prompt_ids"] == tok.encode("The river")
    assert from_workdir["prompt_text"] + from_workdir["completion"] == tok.decode(
        from_workdir["prompt_ids"] + from_workdir["new_ids"])
    assert from_export["new_ids"] == from_workdir["new_ids"]  # the same weights, tokenizer and stop token
    assert from_export["completion"] == from_workdir["completion"]


def test_the_export_carries_tokenizer_special_ids_and_normal_permissions(path_run):
    base, _ = path_run
    out = base / "exported"
    tok = Tokenizer.load(base / "data" / "mine" / "tokenizer.model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model",
                                                   "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_id, tok.eos_id, tok.pad_id)
    assert (out / "tokenizer.model").read_bytes() == tok.path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    for file in out.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


def test_transformers_reads_the_exported_tokenizer(path_run):
    transformers = pytest.importorskip("transformers")
    base, _ = path_run
    tok = Tokenizer.load(base / "data" / "mine" / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(base / "exported")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    texts = [*make_sentences(20, seed=9), "  two leading spaces\nand\ta tab", " the river 日本"]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_from_hf_keeps_the_tokenizer_and_asks_for_data(path_run, capsys):
    from jaxllm.data.shards import fingerprint
    from jaxllm.engine.checkpoint import Checkpointer
    from jaxllm.train import main as train_main

    base, outputs = path_run
    more = base / "runs" / "more"
    assert (more / "data" / "tokenizer.model").read_bytes() == (base / "exported" / "tokenizer.model").read_bytes()
    text = (more / "config.yaml").read_text()
    assert text.startswith("# from-hf was given no data")
    data = yaml.safe_load(text)["data"]
    assert (data["source"], data["path"]) == ("tokens", None)
    assert "names no training data" in outputs[5]
    # Without data.path the run stops with one line naming it, before touching the workdir.
    assert train_main([f"--config={more / 'config.yaml'}", f"--workdir={more}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.path" in err
    # With it (the documented command), the run trained on the shards, not on random tokens.
    ckpt = Checkpointer(more / "checkpoints")
    try:
        assert ckpt.read_meta(3)["data"] == fingerprint(base / "data" / "mine")
    finally:
        ckpt.close()


def test_from_hf_tokenizes_a_text_corpus_with_the_models_tokenizer(path_run, monkeypatch):
    from jaxllm.interop import convert

    base, _ = path_run
    monkeypatch.chdir(base)
    assert convert.main(["from-hf", "exported", "runs/text", *TRAIN, "data.source=text", "data.path=corpus.txt"]) == 0
    text = Path("runs/text/config.yaml").read_text()
    data = yaml.safe_load(text)["data"]
    assert not text.startswith("#") and (data["source"], data["path"]) == ("text", "corpus.txt")
    assert data["tokenizer"] == "runs/text/data/tokenizer.model"  # not a new one trained on the corpus
    assert Path(data["tokenizer"]).read_bytes() == Path("exported/tokenizer.model").read_bytes()
