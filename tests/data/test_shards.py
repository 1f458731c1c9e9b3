"""Tests for jaxllm.data.shards: format, read-back, atomic rewrite and every validation error."""

import json
import pickle
import tempfile
from copy import deepcopy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.data.shards import TokenShards, write_shards
from jaxllm.errors import UserError


def random_docs(rng, count, vocab, max_len=20):
    return [rng.integers(0, vocab, size=rng.integers(1, max_len)).tolist() for _ in range(count)]


@pytest.fixture
def docs():
    return random_docs(np.random.default_rng(0), 30, vocab=500)


@pytest.fixture
def shard_dir(tmp_path, docs):
    return write_shards(docs, tmp_path / "shards", vocab_size=500, tokens_per_shard=64)


def test_round_trip_documents_and_index(shard_dir, docs):
    shards = TokenShards(shard_dir)
    assert shards.num_documents == len(docs)
    assert shards.num_tokens == sum(map(len, docs))
    assert [shards.document(i).tolist() for i in range(len(docs))] == docs
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 500 and len(index["shards"]) > 2
    for entry in index["shards"]:
        raw = np.fromfile(shard_dir / entry["tokens"], dtype="<u2")
        assert raw.size == entry["num_tokens"]
        offsets = np.load(shard_dir / entry["offsets"])
        assert offsets[0] == 0 and offsets[-1] == raw.size and offsets.size == entry["num_documents"] + 1
    assert sorted(p.name for p in shard_dir.iterdir() if p.name.startswith(".")) == []


def test_large_vocab_uses_uint32(tmp_path):
    docs = [[70_000, 1, 2], [99_999]]
    out = write_shards(docs, tmp_path, vocab_size=100_000)
    assert json.loads((out / "index.json").read_text())["dtype"] == "uint32"
    assert (out / "shard_00000.bin").stat().st_size == 4 * 4
    assert TokenShards(out).document(0).tolist() == [70_000, 1, 2]


def test_empty_documents_are_dropped(tmp_path):
    shards = TokenShards(write_shards([[1], [], [2, 3]], tmp_path, vocab_size=10))
    assert shards.num_documents == 2 and shards.document(1).tolist() == [2, 3]


@settings(max_examples=40, deadline=None, database=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=12), per_shard=st.integers(1, 20),
       data=st.data())
def test_stream_reads_match_concatenation(lengths, per_shard, data):
    docs = [list(range(n)) for n in lengths]
    stream = np.concatenate(docs)
    with tempfile.TemporaryDirectory() as tmp:
        shards = TokenShards(write_shards(docs, tmp, vocab_size=16, tokens_per_shard=per_shard))
        start = data.draw(st.integers(0, stream.size))
        stop = data.draw(st.integers(start, stream.size + 3))
        assert shards.read(start, stop).tolist() == stream[start:stop].tolist()
        assert shards.document_starts.tolist() == np.cumsum([0, *lengths]).tolist()


def test_rewrite_replaces_shards_and_removes_stale_files(shard_dir, docs):
    write_shards(docs[:2], shard_dir, vocab_size=500, tokens_per_shard=64)
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == ["index.json", "shard_00000.bin", "shard_00000.idx.npy"]
    assert TokenShards(shard_dir).num_documents == 2


def test_failed_write_leaves_no_index_and_no_temp_files(shard_dir, docs):
    def failing():
        yield docs[0]
        raise RuntimeError("crash while tokenizing")

    with pytest.raises(RuntimeError):
        write_shards(failing(), shard_dir, vocab_size=500)
    assert TokenShards(shard_dir).num_documents == len(docs)  # The old data set is untouched.
    assert not [p for p in shard_dir.iterdir() if p.name.startswith(".")]


def test_pickles_by_path(shard_dir):
    shards = TokenShards(shard_dir)
    payload = pickle.dumps(shards)
    assert len(payload) < 500
    # Rebuilt through the same __getstate__ / __setstate__ path that unpickling in a worker takes.
    assert deepcopy(shards).document(3).tolist() == shards.document(3).tolist()


def test_write_rejects_bad_ids_and_empty_input(tmp_path):
    with pytest.raises(UserError, match="document 1: found token id 10"):
        write_shards([[1], [10]], tmp_path, vocab_size=10)
    with pytest.raises(UserError, match="found token id -1"):
        write_shards([[-1]], tmp_path, vocab_size=10)
    with pytest.raises(UserError, match="no tokens"):
        write_shards([[], []], tmp_path, vocab_size=10)
    assert not (tmp_path / "index.json").exists()


def test_missing_directory_and_index(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        TokenShards(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"index\.json"):
        TokenShards(tmp_path)


def edit_index(shard_dir, change):
    index = json.loads((shard_dir / "index.json").read_text())
    change(index)
    (shard_dir / "index.json").write_text(json.dumps(index))


def test_empty_shard_names_file(shard_dir):
    (shard_dir / "shard_00001.bin").write_bytes(b"")

    def empty(index):
        index["shards"][1]["num_tokens"] = 0

    edit_index(shard_dir, empty)
    with pytest.raises(UserError, match=r"shard_00001\.bin: shard is empty"):
        TokenShards(shard_dir)


def test_truncated_shard_names_file(shard_dir):
    path = shard_dir / "shard_00002.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"shard_00002\.bin: shard is truncated") as info:
        TokenShards(shard_dir)
    assert "\n" not in str(info.value)


def test_missing_shard_and_bad_index(shard_dir):
    (shard_dir / "shard_00001.idx.npy").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"shard_00001\.idx\.npy"):
        TokenShards(shard_dir)
    (shard_dir / "shard_00001.bin").unlink()
    with pytest.raises(UserError, match=r"shard_00001\.bin: shard file not found"):
        TokenShards(shard_dir)
    (shard_dir / "index.json").write_text("{")
    with pytest.raises(UserError, match=r"index\.json: cannot read index"):
        TokenShards(shard_dir)
    edit_index_text = json.dumps({"dtype": "float32", "vocab_size": 5, "shards": [{}]})
    (shard_dir / "index.json").write_text(edit_index_text)
    with pytest.raises(UserError, match="dtype 'float32'"):
        TokenShards(shard_dir)


def test_check_vocab_names_file_and_id(tmp_path):
    docs = [[1, 2], [3, 4], [5, 499], [6]]
    shards = TokenShards(write_shards(docs, tmp_path, vocab_size=500, tokens_per_shard=4))
    shards.check_vocab(500)
    with pytest.raises(UserError, match=r"shard_00001\.bin: found token id 499 at offset 1") as info:
        shards.check_vocab(400, chunk_tokens=1)
    assert "vocab_size 400" in str(info.value)
