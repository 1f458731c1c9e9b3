"""Tests for jaxllm.data.tokenizer: training, special ids, round trips, load errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.data.tokenizer import Tokenizer, train_tokenizer
from jaxllm.errors import UserError
from tests.data.conftest import VOCAB_SIZE


def test_special_ids_and_vocab_size(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Tabs\tand  double spaces,\nnewlines\n\nand trailing space ",
    "日本語のテキストを、バイトで表します。",
    "Mixed: naïve café — 東京 🚀",
    "",
])
def test_round_trip_english_japanese_and_unseen_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.asarray(ids, np.uint16)) == text


@settings(max_examples=50, deadline=None, database=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_learned_pieces_compress_training_text(tokenizer, sentences):
    text = sentences[0]
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2  # Merges, not bytes.


def test_special_ids_decode_to_nothing(tokenizer):
    ids = tokenizer.encode("the cat")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == "the cat"


def test_training_is_deterministic_and_reads_files(tmp_path, sentences, tokenizer_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n\n".join(sentences))
    again = train_tokenizer([corpus], tmp_path / "again", vocab_size=VOCAB_SIZE)
    assert again == tmp_path / "again.model"
    # The .model proto also records the output prefix; the pieces and scores are in the .vocab file.
    assert again.with_suffix(".vocab").read_bytes() == tokenizer_path.with_suffix(".vocab").read_bytes()


def test_training_errors_are_user_errors(tmp_path, sentences):
    with pytest.raises(UserError, match="vocab_size 100000"):
        train_tokenizer(sentences, tmp_path / "big", vocab_size=100_000)
    with pytest.raises(UserError, match="vocab_size 270"):
        train_tokenizer(sentences, tmp_path / "small", vocab_size=270)
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", "  "], tmp_path / "empty", vocab_size=300)


def test_load_missing_or_corrupt_file_names_it(tmp_path):
    with pytest.raises(UserError, match=r"missing\.model") as info:
        Tokenizer.load(tmp_path / "missing.model")
    assert "\n" not in str(info.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"bad\.model"):
        Tokenizer.load(bad)


def test_a_run_keeps_its_shards_tokenizer_and_refuses_another(tmp_path, tokenizer_path):
    from jaxllm.data.tokenizer import record_run_tokenizer, workdir_tokenizer_file

    shards, workdir = tmp_path / "shards", tmp_path / "run"
    shards.mkdir()
    assert record_run_tokenizer(shards, workdir) is None and not workdir.exists()  # shards without one
    (shards / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    kept = record_run_tokenizer(shards, workdir)
    assert kept == workdir_tokenizer_file(workdir) == workdir / "data" / "tokenizer.model"
    assert kept.read_bytes() == tokenizer_path.read_bytes()
    assert record_run_tokenizer(shards, workdir) == kept  # the same file again: nothing to do
    assert record_run_tokenizer(workdir / "data", workdir) == kept  # shards in WORKDIR/data itself
    other = train_tokenizer(["other words entirely"] * 50, tmp_path / "other", vocab_size=280)
    (shards / "tokenizer.model").write_bytes(other.read_bytes())
    with pytest.raises(UserError, match=r"run/data/tokenizer.model differs from .*shards/tokenizer.model"):
        record_run_tokenizer(shards, workdir)
    assert kept.read_bytes() == tokenizer_path.read_bytes()  # never overwritten
    assert sorted(p.name for p in kept.parent.iterdir()) == ["tokenizer.model"]  # no temporary file left
