"""The offline data analyzer on a corpus small enough to check by hand; crash-restart; the fingerprint check."""

import math
import subprocess

import numpy as np
import pytest

from jaxllm.data.analyze import analyze, dataset_fingerprint, open_metric_index
from jaxllm.data.shards import write_shards
from jaxllm.errors import UserError
from tests.conftest import PYTHON, subprocess_env

DOCS = [[1, 2, 3, 1, 2], [4, 4, 5], [1, 6, 7, 1, 2, 3]]
# The stream 1 2 3 1 2 4 4 5 1 6 7 1 2 3 cut into rows of 4 inputs (+1 look-ahead): ceil(13 / 4) = 4 rows.
ROWS = [[1, 2, 3, 1], [2, 4, 4, 5], [1, 6, 7, 1], [2, 3]]  # the last row is padded after 2 tokens


def first_token(row):
    """A user-defined metric: the row's first token id."""
    return int(row["inputs"][0])


@pytest.fixture
def corpus(tmp_path):
    return write_shards(DOCS, tmp_path / "tokens", vocab_size=8, tokens_per_shard=6)


def expected_rarity():
    counts = {1: 4, 2: 3, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1}  # token counts over the rows, by hand
    total = sum(counts.values())
    return [int(sum(-math.log(counts[t] / total) for t in row)) for row in ROWS]


def test_index_files_match_hand_computation(corpus, tmp_path):
    out = tmp_path / "index"
    dirs = analyze(corpus, 4, out, ["vocab_rarity", "first=tests.data.test_analyze:first_token"], workers=1,
                   chunk_rows=3, log=lambda _: None)
    assert expected_rarity() == [5, 8, 7, 3]
    freq = np.load(out / "total_vocab_freq.npy")
    assert freq.tolist() == [0, 4, 3, 2, 2, 1, 1, 1]
    rarity = open_metric_index(dirs["vocab_rarity"], dataset_fingerprint(corpus, 4))
    assert rarity.sample_to_metric.tolist() == [5, 8, 7, 3] and rarity.sample_to_metric.dtype == np.uint8
    assert rarity.index_to_metric.tolist() == [3, 5, 7, 8]
    rows = [rarity.index_to_sample[a:b].tolist() for a, b in zip(rarity.offsets[:-1], rarity.offsets[1:],
                                                                    strict=True)]
    assert rows == [[3], [0], [2], [1]]
    first = open_metric_index(out / "first" / "index_to_sample.npy")  # DeepSpeed-style path to a file inside
    assert first.sample_to_metric.tolist() == [1, 2, 1, 2] and first.index_to_metric.tolist() == [1, 2]
    assert first.index_to_sample.tolist() == [0, 2, 1, 3] and first.offsets.tolist() == [0, 2, 4]
    merged = np.load(out / "first" / "index_to_sample_percentile_merged.offsets.npy")
    assert merged.tolist() == [0, 2, 4]  # fewer than 100 values: one value per merged row
    assert not (out / ".map").exists()


def run_cli(args, fault=None):
    env = subprocess_env(1)
    if fault:
        env["JAXLLM_FAULT"] = fault
    return subprocess.run([PYTHON, "-m", "jaxllm.data.analyze", *args], capture_output=True, text=True, env=env,
                          timeout=240)


@pytest.mark.slow
def test_cli_with_workers_restarts_after_a_crash(corpus, tmp_path):
    args = ["--data", str(corpus), "--seq-len", "4", "--metrics",
            "vocab_rarity,first=tests.data.test_analyze:first_token", "--workers", "2", "--chunk-rows", "1"]
    straight = run_cli([*args, "--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    crashed = run_cli([*args, "--out", str(tmp_path / "crashed")], fault="analyze_after_chunks:2")
    assert crashed.returncode == -9
    assert not (tmp_path / "crashed" / "total_vocab_freq.json").exists()  # killed before the first reduce
    resumed = run_cli([*args, "--out", str(tmp_path / "crashed")])
    assert resumed.returncode == 0, resumed.stderr
    done = int(resumed.stdout.split("map total_vocab_freq: ")[1].split(" of")[0])
    assert done >= 2  # the chunks finished before the crash are not mapped again
    for metric in ("vocab_rarity", "first"):
        for name in ("sample_to_metric", "index_to_metric", "index_to_sample", "index_to_sample.offsets"):
            a = np.load(tmp_path / "straight" / metric / f"{name}.npy")
            b = np.load(tmp_path / "crashed" / metric / f"{name}.npy")
            assert np.array_equal(a, b) and a.dtype == b.dtype
    again = run_cli([*args, "--out", str(tmp_path / "crashed")])  # everything done: nothing is redone
    assert again.returncode == 0 and "map" not in again.stdout


def test_index_built_for_other_data_is_refused(corpus, tmp_path):
    dirs = analyze(corpus, 4, tmp_path / "index", ["first=tests.data.test_analyze:first_token"], log=lambda _: None)
    other = write_shards([[1, 2, 3, 4, 5, 6, 7, 1, 2]], tmp_path / "other", vocab_size=8)
    with pytest.raises(UserError, match="built for different data"):
        open_metric_index(dirs["first"], dataset_fingerprint(other, 4))
    with pytest.raises(UserError, match="built for different data"):  # same tokens, other row length
        open_metric_index(dirs["first"], dataset_fingerprint(corpus, 8))
    with pytest.raises(UserError, match="NAME=module:function"):
        analyze(corpus, 4, tmp_path / "x", ["rarity"], log=lambda _: None)
    with pytest.raises(UserError, match="cannot import"):
        analyze(corpus, 4, tmp_path / "x", ["m=tests.data.test_analyze:missing"], log=lambda _: None)
