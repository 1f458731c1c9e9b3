"""Tests for jaxllm.data.pipeline: packing against a per-token reference, splits, Grain batching, resume."""

import json
import pickle
import tempfile
from copy import deepcopy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.data.pipeline import (
    ROW_KEYS,
    PackedRows,
    SyntheticRows,
    make_eval_batches,
    make_train_iterator,
    split_train_eval,
)
from jaxllm.data.shards import TokenShards, write_shards
from jaxllm.errors import UserError

DTYPES = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
          "loss_mask": np.float32}


class IndexRows:
    """Row i is filled with the value i, so batches reveal which rows they hold."""

    def __init__(self, n, seq_len=3):
        self.n, self.seq_len = n, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        row = np.full(self.seq_len, i, np.int32)
        return {"inputs": row, "targets": row, "segment_ids": row, "positions": row,
                "loss_mask": row.astype(np.float32)}


def packed(docs, seq_len, tmp, **kwargs):
    shards = TokenShards(write_shards(docs, tmp, vocab_size=1000, tokens_per_shard=7))
    return PackedRows(shards, seq_len, **kwargs)


def reference(docs):
    """Per stream position: token, document number, offset in the document (plain Python)."""
    return [(tok, d, k) for d, doc in enumerate(docs) for k, tok in enumerate(doc)]


def check_row(row, start, ref, seq_len, continue_positions=True):
    for key, dtype in DTYPES.items():
        assert row[key].dtype == dtype and row[key].shape == (seq_len,), key
    segment_of_doc = {}
    first_doc = ref[start][1]
    for j in range(seq_len):
        p = start + j
        if p >= len(ref):  # Padding.
            assert all(row[key][j] == 0 for key in ROW_KEYS)
            continue
        tok, doc, offset = ref[p]
        assert row["inputs"][j] == tok
        segment = segment_of_doc.setdefault(doc, len(segment_of_doc) + 1)
        assert row["segment_ids"][j] == segment
        if continue_positions or doc != first_doc:
            assert row["positions"][j] == offset
        else:
            assert row["positions"][j] == offset - ref[start][2]
        has_next = p + 1 < len(ref)
        assert row["targets"][j] == (ref[p + 1][0] if has_next else 0)
        assert row["loss_mask"][j] == float(has_next and ref[p + 1][1] == doc)


@settings(max_examples=60, deadline=None, database=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=10), seq_len=st.integers(1, 9),
       continue_positions=st.booleans(), seed=st.integers(0, 2**16))
def test_packing_matches_per_token_reference(lengths, seq_len, continue_positions, seed):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 1000, size=n).tolist() for n in lengths]
    ref = reference(docs)
    with tempfile.TemporaryDirectory() as tmp:
        rows = packed(docs, seq_len, tmp, continue_positions=continue_positions)
        assert len(rows) == -(-(len(ref) - 1) // seq_len)
        for i in range(len(rows)):
            row = rows[i]
            check_row(row, i * seq_len, ref, seq_len, continue_positions)
            # Never across documents: a counted target shares the input's segment and continues it.
            counted = row["loss_mask"] == 1
            assert np.all(row["segment_ids"][counted] > 0)
            nxt = np.append(row["segment_ids"][1:], -1)
            assert np.all(nxt[:-1][counted[:-1]] == row["segment_ids"][:-1][counted[:-1]])


def test_documents_reconstruct_from_rows(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(4, 1000, size=rng.integers(1, 40)).tolist() for _ in range(25)]
    docs = [[*doc, 3] for doc in docs]
    rows = packed(docs, 16, tmp_path)
    rebuilt, last_target = [], None
    for i in range(len(rows)):
        row = rows[i]
        for j in np.flatnonzero(row["segment_ids"]):
            if row["positions"][j] == 0:
                rebuilt.append([])
            rebuilt[-1].append(int(row["inputs"][j]))
            last_target = int(row["targets"][j])
    total = sum(map(len, docs))
    if sum(map(len, rebuilt)) == total - 1:  # The stream's final token was only a target.
        rebuilt[-1].append(last_target)
    assert rebuilt == docs
    assert rows[-1]["segment_ids"][-1] == 0  # 25 documents do not fill the last row exactly.


def test_rows_are_views_of_the_stream_with_bounds(tmp_path):
    rows = packed([[5, 6, 7, 3], [8, 9, 3]], 3, tmp_path)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[1]["inputs"], [3, 8, 9])
    np.testing.assert_array_equal(rows[1]["loss_mask"], [0, 1, 1])
    np.testing.assert_array_equal(rows[-1]["targets"], rows[1]["targets"])
    with pytest.raises(IndexError):
        rows[2]


def test_sources_pickle_for_worker_processes(tmp_path):
    for source in (packed([[5, 6, 7, 3], [8, 9, 3]], 3, tmp_path), SyntheticRows(40, 6, 3, seed=4)):
        pickle.dumps(source)  # raises if a worker process could not receive it
        copy = deepcopy(source)  # rebuilt through the same __reduce_ex__ / __setstate__ path as unpickling
        assert all(np.array_equal(copy[1][k], source[1][k]) for k in ROW_KEYS)


def test_synthetic_rows_are_deterministic_learnable_and_in_range():
    a, b = SyntheticRows(50, 32, 10, seed=1), SyntheticRows(50, 32, 10, seed=1)
    row = a[3]
    assert set(row) == set(ROW_KEYS)
    for key in ROW_KEYS:
        np.testing.assert_array_equal(row[key], b[3][key])
        assert row[key].dtype == DTYPES[key] and row[key].shape == (32,)
    assert not np.array_equal(row["inputs"], SyntheticRows(50, 32, 10, seed=2)[3]["inputs"])
    np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
    assert row["inputs"].min() >= 0 and row["inputs"].max() < 50
    steps = (row["targets"] - row["inputs"]) % 50
    assert np.bincount(steps).max() >= 24  # Mostly one constant stride.
    assert np.all(row["loss_mask"] == 1) and np.all(row["segment_ids"] == 1)


def test_split_train_eval():
    source = IndexRows(10)
    train, held = split_train_eval(source, eval_rows=3)
    assert [train[i]["inputs"][0] for i in range(len(train))] == list(range(7))
    assert [held[i]["inputs"][0] for i in range(len(held))] == [7, 8, 9]
    assert len(split_train_eval(source, eval_fraction=0.01)[1]) == 1
    with pytest.raises(UserError, match="eval_rows"):
        split_train_eval(source, eval_rows=10)
    with pytest.raises(UserError, match="exactly one"):
        split_train_eval(source)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def ids(batch):
    return batch["inputs"][:, 0].tolist()


def flat(lists):
    return [x for sub in lists for x in sub]


def test_train_batches_repeat_with_a_fresh_shuffle_per_epoch():
    it = make_train_iterator(IndexRows(12), global_batch_size=4, seed=0)
    epochs = [flat(ids(b) for b in take(it, 3)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]
    again = make_train_iterator(IndexRows(12), global_batch_size=4, seed=0)
    assert flat(ids(b) for b in take(again, 9)) == flat(epochs)


def test_packed_batches_have_the_row_format(tmp_path):
    rows = packed([list(range(4, 30)), list(range(5, 40))], 8, tmp_path)
    batch = next(make_train_iterator(rows, global_batch_size=4, seed=3))
    for key, dtype in DTYPES.items():
        assert batch[key].shape == (4, 8) and batch[key].dtype == dtype


@settings(max_examples=15, deadline=None, database=None)
@given(before=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_resume_from_json_state_equals_uninterrupted(before, seed):
    source = IndexRows(10, seq_len=2)
    full = take(make_train_iterator(source, 4, seed), before + 5)
    it = make_train_iterator(source, 4, seed)
    take(it, before)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_train_iterator(source, 4, seed)
    resumed.set_state(state)
    for want, got in zip(full[before:], take(resumed, 5), strict=True):
        for key in ROW_KEYS:
            assert want[key].tobytes() == got[key].tobytes()


@pytest.mark.parametrize("num_rows", [24, 20])
def test_process_shards_are_disjoint_and_cover_the_global_batch(num_rows):
    source = IndexRows(num_rows)
    whole = take(make_train_iterator(source, 8, seed=5), 6)
    parts = [take(make_train_iterator(source, 8, seed=5, process_index=p, process_count=4), 6)
             for p in range(4)]
    for step, batch in enumerate(whole):
        local = [ids(parts[p][step]) for p in range(4)]
        assert all(len(x) == 2 for x in local)
        merged = flat(local)
        assert sorted(merged) == sorted(ids(batch))
        if num_rows % 8 == 0:  # Otherwise a batch may straddle two epochs and hold a row twice.
            assert len(set(merged)) == 8


def test_train_iterator_errors():
    with pytest.raises(UserError, match="multiple of the process count 3"):
        make_train_iterator(IndexRows(20), 8, seed=0, process_count=3)
    with pytest.raises(UserError, match="only 5 rows"):
        make_train_iterator(IndexRows(5), 8, seed=0)
    with pytest.raises(UserError, match="process_index"):
        make_train_iterator(IndexRows(20), 8, seed=0, process_index=2, process_count=2)


def test_eval_batches_are_fixed_and_split_between_processes():
    source = IndexRows(11)
    first = make_eval_batches(source, 4, num_batches=5)
    assert [ids(b) for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # Only full batches.
    second = make_eval_batches(source, 4, num_batches=5)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, second, strict=True) for k in ROW_KEYS)
    halves = [make_eval_batches(source, 4, 2, process_index=p, process_count=2) for p in range(2)]
    assert [ids(b) for b in halves[0]] == [[0, 2], [4, 6]] and [ids(b) for b in halves[1]] == [[1, 3], [5, 7]]
    with pytest.raises(UserError, match="only 3 rows"):
        make_eval_batches(IndexRows(3), 4, 1)


def test_iterator_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    it = make_train_iterator(SyntheticRows(50, 8, 20), 4, seed=1)
    take(it, 3)
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    want = take(it, 3)
    resumed = make_train_iterator(SyntheticRows(50, 8, 20), 4, seed=1)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for a, b in zip(want, take(resumed, 3), strict=True):
        assert all(a[k].tobytes() == b[k].tobytes() for k in ROW_KEYS)
