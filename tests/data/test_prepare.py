"""Tests for jaxllm.data.prepare: corpus files to shards, the function and the command."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.data.prepare import main, prepare_corpus
from jaxllm.data.shards import TokenShards
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.errors import UserError
from tests.conftest import own_stderr
from tests.data.conftest import make_sentences

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus_files(tmp_path):
    sentences = make_sentences(300, seed=1)
    jsonl = tmp_path / "a.jsonl"
    grouped = [" ".join(sentences[i:i + 3]) for i in range(0, 150, 3)]
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in grouped))
    txt = tmp_path / "b.txt"
    txt.write_text("\n\n\n".join(sentences[150:]) + "\n")
    return [jsonl, txt], grouped + sentences[150:]


def test_prepare_trains_tokenizer_and_documents_decode_back(tmp_path, corpus_files):
    files, documents = corpus_files
    out = prepare_corpus(files, tmp_path / "data", vocab_size=350, tokens_per_shard=500)
    tok = Tokenizer.load(out / "tokenizer.model")
    shards = TokenShards(out)
    assert tok.vocab_size == shards.vocab_size == 350
    assert shards.num_documents == len(documents) and len(list(out.glob("shard_*.bin"))) > 1
    for i, text in enumerate(documents):
        ids = shards.document(i).tolist()
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    assert shards.metadata["tokenizer"] == "tokenizer.model" and shards.metadata["eos_id"] == 3


def test_prepare_with_given_tokenizer_copies_it(tmp_path, corpus_files, tokenizer_path, tokenizer):
    files, documents = corpus_files
    out = prepare_corpus(files[:1], tmp_path / "data", tokenizer=tokenizer_path)
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert TokenShards(out).document(0).tolist() == [*tokenizer.encode(documents[0]), tokenizer.eos_id]


def test_prepare_errors(tmp_path, corpus_files):
    files, _ = corpus_files
    with pytest.raises(UserError, match=r"missing\.model"):
        prepare_corpus(files, tmp_path / "d", tokenizer=tmp_path / "missing.model")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no documents"):
        prepare_corpus([empty], tmp_path / "d")


def test_main_success_and_exit_2_with_one_line(tmp_path, corpus_files, capsys):
    files, _ = corpus_files
    assert main(["--input", *map(str, files), "--out", str(tmp_path / "d"), "--vocab-size", "350"]) == 0
    assert "documents" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.txt" in err
    (tmp_path / "file").write_text("x")
    assert main(["--input", *map(str, files), "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'}: '{tmp_path / 'file'}' is a file, not a directory" in capsys.readouterr().err
    # An existing shard directory is not replaced unless asked.
    before = (tmp_path / "d" / "index.json").read_bytes()
    assert main(["--input", *map(str, files), "--out", str(tmp_path / "d"), "--vocab-size", "400"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds index.json" in err and "--overwrite" in err
    assert (tmp_path / "d" / "index.json").read_bytes() == before
    assert main(["--input", *map(str, files), "--out", str(tmp_path / "d"), "--vocab-size", "400",
                 "--overwrite"]) == 0
    assert (tmp_path / "d" / "index.json").read_bytes() != before


def test_module_entry_point(tmp_path, corpus_files, tokenizer_path):
    files, _ = corpus_files
    ok = subprocess.run([sys.executable, "-m", "jaxllm.data.prepare", "--input", str(files[1]),
                         "--out", str(tmp_path / "d"), "--tokenizer", str(tokenizer_path)],
                        capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert ok.returncode == 0, ok.stderr
    assert TokenShards(tmp_path / "d").num_documents == 150
    bad = subprocess.run([sys.executable, "-m", "jaxllm.data.prepare", "--input", str(files[1]),
                          "--out", str(tmp_path / "e"), "--vocab-size", "100"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert bad.returncode == 2 and own_stderr(bad.stderr).count("\n") == 1 and "vocab_size 100" in bad.stderr


def _limit(message: str) -> int:
    return int(re.search(r"a value <= (\d+)", message).group(1))


def test_vocabulary_limits_name_the_model_type_and_hold(tmp_path, corpus_files, capsys):
    """prepare (BPE) and train_tokenizer (unigram, LLM-jp settings) allow different largest vocabularies on
    the same files; each refusal names its model type and a limit that the same command then accepts."""
    from jaxllm.data import train_tokenizer

    files = [str(f) for f in corpus_files[0]]
    assert main(["--input", *files, "--out", str(tmp_path / "p"), "--vocab-size", "5000"]) == 2
    bpe = capsys.readouterr().err
    assert "rejected for a bpe model" in bpe
    assert train_tokenizer.main(["--input", *files, "--out", str(tmp_path / "t"), "--vocab-size", "5000"]) == 2
    unigram = capsys.readouterr().err
    assert "rejected for a unigram model" in unigram
    assert _limit(unigram) < _limit(bpe)
    between = (_limit(unigram) + _limit(bpe)) // 2  # passes prepare, fails train_tokenizer
    assert main(["--input", *files, "--out", str(tmp_path / "p"), "--vocab-size", str(between)]) == 0
    assert Tokenizer.load(tmp_path / "p" / "tokenizer.model").vocab_size == between
    capsys.readouterr()
    assert train_tokenizer.main(["--input", *files, "--out", str(tmp_path / "t"), "--vocab-size", str(between)]) == 2
    assert train_tokenizer.main(["--input", *files, "--out", str(tmp_path / "t"),
                                 "--vocab-size", str(_limit(unigram))]) == 0


def test_a_failed_prepare_leaves_no_directory_behind(tmp_path, corpus_files, capsys):
    files = [str(f) for f in corpus_files[0]]
    for out in (tmp_path / "new", tmp_path / "nested" / "deeper" / "new"):
        assert main(["--input", *files, "--out", str(out), "--vocab-size", "5000"]) == 2
        assert not out.exists() and not (tmp_path / "nested").exists()
    from jaxllm.data import train_tokenizer

    assert train_tokenizer.main(["--input", *files, "--out", str(tmp_path / "tok" / "new"), "--vocab-size",
                                 "5000"]) == 2
    assert not (tmp_path / "tok").exists()
    (tmp_path / "kept").mkdir()  # a directory the user made stays, empty as it was
    assert main(["--input", *files, "--out", str(tmp_path / "kept"), "--vocab-size", "5000"]) == 2
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())
    assert "vocab_size 5000" in capsys.readouterr().err
