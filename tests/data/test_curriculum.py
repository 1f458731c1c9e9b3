"""Curriculum schedules (DeepSpeed's values), seqlen transforms, the cluster sampler and the DeepSpeed translator."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.data.analyze import MetricIndex
from jaxllm.data.curriculum import (
    apply_seqlen,
    check_schedule,
    difficulty_for_batch,
    reshape_batch,
    schedule_value,
    truncate_batch,
)
from jaxllm.data.curriculum_sampler import ClusterSampler, CurriculumIterator
from jaxllm.errors import UserError
from jaxllm.interop.deepspeed_data_efficiency import translate


def linear(low, high, total, step):
    return {"min_difficulty": low, "max_difficulty": high, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": total, "difficulty_step": step}}


def test_deepspeed_unit_test_values():
    # tests/unit/runtime/test_data_efficiency.py: legacy curriculum, steps 1..10.
    discrete = {"min_difficulty": 1, "max_difficulty": 5, "schedule_type": "fixed_discrete",
                "schedule_config": {"difficulty": [1, 2, 3, 4, 5], "max_step": [2, 4, 6, 8]}}
    assert [schedule_value(discrete, t) for t in range(1, 11)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [schedule_value(linear(2, 10, 8, 2), t) for t in range(1, 11)] == [2, 4, 4, 6, 6, 8, 8, 10, 10, 10]
    # The legacy engine calls update_difficulty(global_steps + 1): 0-based training step 0 -> step 1.
    assert [difficulty_for_batch(linear(2, 10, 8, 2), t) for t in range(4)] == [2, 4, 4, 6]


def test_fixed_linear_and_root_match_the_formula_at_many_steps():
    steps = np.arange(0, 3000, 7)
    cfg = linear(64, 1024, 2000, 8)
    # Independent vectorised formula: floor(t/T*(max-min)+min), down to a multiple of 8, capped at max.
    expected = np.floor(steps / 2000 * 960 + 64).astype(int)
    expected = np.minimum(expected - expected % 8, 1024)
    assert [schedule_value(cfg, int(t)) for t in steps] == expected.tolist()
    root = {**linear(8, 64, 100, 8), "schedule_type": "fixed_root"}
    root["schedule_config"] = {**root["schedule_config"], "root_degree": 2}
    # By hand: t=1: sqrt(.01)*56+8 = 13.6 -> 13 -> 8; t=25: .5*56+8 = 36 -> 32; t=64: .8*56+8 = 52.8 -> 48;
    # t=100: 64; t=200: sqrt(2)*56+8 = 87.2 -> 80 -> capped 64.
    assert [schedule_value(root, t) for t in (0, 1, 25, 64, 100, 200)] == [8, 8, 32, 48, 64, 64]


def test_custom_schedules_are_callables():
    assert schedule_value(lambda step: 3 * step, 7) == 21
    cfg = {"min_difficulty": 1, "max_difficulty": 9, "schedule_type": "custom",
           "schedule_config": {"function": lambda step: min(9, step)}}
    assert [schedule_value(cfg, t) for t in (1, 5, 20)] == [1, 5, 9]


def test_bad_schedules_get_clear_errors():
    with pytest.raises(UserError, match="min_difficulty 100 exceeds max_difficulty 10"):
        check_schedule(linear(100, 10, 5, 1), "cl")
    with pytest.raises(UserError, match="difficulty_step"):
        check_schedule(linear(1, 10, 5, 0), "cl")
    bad = {"min_difficulty": 1, "max_difficulty": 3, "schedule_type": "fixed_discrete",
           "schedule_config": {"difficulty": [1, 2], "max_step": [5, 6]}}
    with pytest.raises(UserError, match="one more difficulty"):
        check_schedule(bad, "cl")
    with pytest.raises(UserError, match="schedule_type"):
        check_schedule({**linear(1, 2, 3, 1), "schedule_type": "cubic"}, "cl")


SEQLEN = ["curriculum.enabled=true", "curriculum.curriculum_metrics.seqlen_truncate.clustering_type=single_cluster",
          "curriculum.curriculum_metrics.seqlen_truncate.schedule_config.total_curriculum_step=10",
          "curriculum.curriculum_metrics.seqlen_truncate.schedule_config.difficulty_step=8", "data.seq_len=64"]


def test_config_section_and_its_errors():
    cfg = config_lib.load(None, [*SEQLEN, "curriculum.curriculum_metrics.seqlen_truncate.min_difficulty=8",
                                 "curriculum.curriculum_metrics.seqlen_truncate.max_difficulty=64"])
    assert schedule_value(cfg.curriculum.schedule("seqlen_truncate"), 5) == 32
    cases = [(["min_difficulty=64", "max_difficulty=8"], "exceeds max_difficulty"),
             (["min_difficulty=8", "max_difficulty=128"], "may not exceed data.seq_len=64"),
             (["min_difficulty=4", "max_difficulty=64"], "length 0"),
             (["min_difficulty=8", "max_difficulty=64", "clustering_type=schedule_based"], "single_cluster"),
             (["min_difficulty=8", "max_dificulty=64"], "did you mean")]
    prefix = "curriculum.curriculum_metrics.seqlen_truncate."
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            config_lib.load(None, [*SEQLEN, *(prefix + e for e in extra)])


def batch_of(rows, length):
    tokens = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
    return {"inputs": tokens, "targets": tokens + 1, "segment_ids": np.ones_like(tokens),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "loss_mask": np.ones(tokens.shape, np.float32)}


def test_seqlen_truncate_and_reshape_by_hand():
    batch = batch_of(2, 6)
    cut = truncate_batch(batch, 4)
    assert cut["inputs"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]] and cut["targets"][1, 3] == 10
    # Reshape to 4: each row gives [0:4] and its last 4 tokens [2:6]; DeepSpeed keeps ceil(12 / 4) = 3 rows.
    folded = reshape_batch(batch, 4)
    assert folded["inputs"].tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert folded["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    # Rounded up to a multiple of 2 rows (data shards): 4 rows.
    assert reshape_batch(batch, 4, row_multiple=2)["inputs"][3].tolist() == [8, 9, 10, 11]
    # A divisor folds exactly.
    assert apply_seqlen(batch, "seqlen_reshape", 3)["inputs"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8],
                                                                          [9, 10, 11]]
    assert apply_seqlen(batch, "seqlen_truncate", 6) is batch


def fake_index(name, values):
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    unique, counts = np.unique(values, return_counts=True)
    return MetricIndex(name, Path("."), values, unique, order, np.concatenate([[0], np.cumsum(counts)]))


RARITY = {"min_difficulty": 2, "max_difficulty": 5, "schedule_type": "fixed_linear",
          "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 1},
          "difficulty_type": "value", "clustering_type": "schedule_based"}


def test_sampler_clusters_follow_the_schedule():
    values = np.arange(40) % 6  # sample i has difficulty i % 6 (0..5)
    sampler = ClusterSampler({"rarity": RARITY}, {"rarity": fake_index("rarity", values)}, 36, 8, seed=3)
    seen = []
    for _ in range(8):
        batch = sampler.next_batch()
        assert batch.shape == (8,) and batch.max() < 36  # never rows past the training rows
        seen.append((sampler.difficulties["rarity"], set(values[batch].tolist())))
    # Step 1: difficulty floor(1/6*3+2) = 2 -> only values <= 2 exist in the first cluster.
    assert seen[0][0] == 2 and seen[0][1] <= {0, 1, 2}
    for difficulty, vals in seen:
        assert max(vals) <= difficulty
    # The clusters are (-inf, 2], (2, 3], (3, 4], (4, 5]: value-based ranges of the schedule.
    assert [sorted(set(values[c])) for c in sampler.clusters] == [[0, 1, 2], [3], [4], [5]]


def test_sampler_percentile_and_two_metric_clusters():
    values = np.arange(200)[::-1].copy()  # sample i has value 199 - i; 2 samples per percentile
    pct = {**RARITY, "difficulty_type": "percentile", "min_difficulty": 25, "max_difficulty": 100,
           "schedule_config": {"total_curriculum_step": 3, "difficulty_step": 25}}
    sampler = ClusterSampler({"m": pct}, {"m": fake_index("m", values)}, 200, 4, seed=0)
    sampler.next_batch()  # step 1: floor(1/3*75+25) = 50 -> percentile 50: the 100 smallest values
    assert sorted(values[sampler.clusters[0]].tolist()) == list(range(100))
    sampler.next_batch()  # step 2: 75 -> ranks [100, 150)
    assert sorted(values[sampler.clusters[1]].tolist()) == list(range(100, 150))
    other = fake_index("n", np.arange(40) % 2)
    two = ClusterSampler({"m": RARITY, "n": {**RARITY, "min_difficulty": 0, "max_difficulty": 1}},
                         {"m": fake_index("m", np.arange(40) % 6), "n": other}, 40, 4, seed=0)
    two.next_batch()
    first = two.clusters[0]  # values m <= 2 and n <= d_n
    assert set((np.arange(40) % 6)[first].tolist()) <= {0, 1, 2}


def test_sampler_is_deterministic_and_resumes_exactly():
    index = {"rarity": fake_index("rarity", np.arange(50) % 6)}

    def make(seed=11):
        return CurriculumIterator(
            [{"inputs": np.full(2, i)} for i in range(50)], ClusterSampler({"rarity": RARITY}, index, 50, 6, seed))

    straight = make()
    want = [next(straight)["inputs"][:, 0].tolist() for _ in range(12)]
    again = make()
    assert [next(again)["inputs"][:, 0].tolist() for _ in range(12)] == want
    assert [next(make(12))["inputs"][:, 0].tolist() for _ in range(1)] != want[:1]
    first = make()
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what Grain's checkpoint handler stores
    resumed = make()
    resumed.set_state(state)
    assert [next(resumed)["inputs"][:, 0].tolist() for _ in range(5)] == want[7:]
    # Every sample of a cluster is read once before any repeats (sequential reads of a permutation).
    sampler = ClusterSampler({"rarity": {**RARITY, "min_difficulty": 5}}, index, 50, 10, seed=1)
    drawn = np.concatenate([sampler.next_batch() for _ in range(5)])
    assert sorted(drawn.tolist()) == list(range(50))


def test_sampler_errors():
    index = {"rarity": fake_index("rarity", np.arange(20) + 10)}
    with pytest.raises(UserError, match="no training sample"):
        ClusterSampler({"rarity": RARITY}, index, 20, 4, seed=0).next_batch()
    with pytest.raises(UserError, match="covers 20 samples"):
        ClusterSampler({"rarity": RARITY}, index, 30, 4, seed=0)
    sampler = ClusterSampler({"rarity": {**RARITY, "min_difficulty": 30, "max_difficulty": 40}}, index, 20, 4, 0)
    sampler.next_batch()
    changed = ClusterSampler({"rarity": {**RARITY, "min_difficulty": 20, "max_difficulty": 29}}, index, 20, 4, 0)
    with pytest.raises(UserError, match="does not match"):
        changed.set_state(sampler.get_state())


GPT2_LTD = {  # DeepSpeedExamples data_efficiency/gpt_finetuning/config/ds_config_gpt_base_random_ltd.json
    "train_batch_size": 4, "data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {
        "enabled": True, "total_layer_num": 12, "random_ltd_layer_num": 10,
        "random_ltd_layer_id": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "model_mask_name": "attention_mask",
        "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
        "random_ltd_schedule": {"min_value": 128, "max_value": 1024, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 400, "seq_per_step": 8}}}}}}


def test_translate_deepspeed_random_ltd_and_sampling_configs():
    sections = translate(GPT2_LTD)
    cfg = config_lib.from_dict({"model": {"layers": 12, "max_len": 1024}, "data": {"seq_len": 1024}, **sections})
    assert cfg.random_ltd.enabled and cfg.random_ltd.layer_ids(12) == tuple(range(1, 11))
    from jaxllm.ltd import kept_length

    assert kept_length(cfg.random_ltd.schedule(), 200) == 576
    with pytest.raises(UserError, match="total_layer_num"):  # the DeepSpeed config says 12 layers
        config_lib.from_dict({"model": {"layers": 6, "max_len": 1024}, "data": {"seq_len": 1024}, **sections})

    sampling = {"data_efficiency": {"enabled": True, "seed": 42, "data_sampling": {
        "enabled": True, "num_epochs": 1, "num_workers": 0, "curriculum_learning": {
            "enabled": True, "data_cluster_path": "/tmp/clusters", "curriculum_metrics": {
                "vocab_rarity": {"index_to_sample_path": "idx/vocab_rarity/index_to_sample",
                                 "index_to_metric_path": "idx/vocab_rarity/index_to_metric",
                                 "difficulty_type": "percentile", "clustering_type": "schedule_based",
                                 "min_difficulty": 1, "max_difficulty": 100, "schedule_type": "fixed_root",
                                 "schedule_config": {"total_curriculum_step": 100, "difficulty_step": 1,
                                                     "root_degree": 2}},
                "seqlen_truncate": {"index_to_sample_path": "dummy", "index_to_metric_path": "dummy",
                                    "difficulty_type": "value", "clustering_type": "single_cluster",
                                    "min_difficulty": 64, "max_difficulty": 512, "schedule_type": "fixed_linear",
                                    "schedule_config": {"total_curriculum_step": 100, "difficulty_step": 8}}}}}}}
    cfg = config_lib.from_dict({"model": {"max_len": 512}, "data": {"seq_len": 512}, **translate(sampling)})
    assert cfg.curriculum.enabled and cfg.curriculum.seed == 42
    assert cfg.curriculum.curriculum_metrics["vocab_rarity"].difficulty_type == "percentile"
    assert schedule_value(cfg.curriculum.schedule("seqlen_truncate"), 50) == 288
    legacy = translate({"curriculum_learning": {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8,
                                                "max_difficulty": 64, "schedule_type": "fixed_linear",
                                                "schedule_config": {"total_curriculum_step": 8,
                                                                    "difficulty_step": 8}}})
    cfg = config_lib.from_dict({"data": {"seq_len": 64}, **legacy})
    assert [difficulty_for_batch(cfg.curriculum.schedule("seqlen_truncate"), t) for t in range(3)] == [8, 16, 24]


def test_translate_rejects_what_it_cannot_honour():
    bad = json.loads(json.dumps(GPT2_LTD))
    bad["data_efficiency"]["data_routing"]["random_ltd"]["model_type"] = "encoder"
    with pytest.raises(UserError, match="model_type"):
        translate(bad)
    bad["data_efficiency"]["data_routing"]["random_ltd"]["model_type"] = "decoder"
    bad["data_efficiency"]["data_routing"]["random_ltd"]["random_ltd_schedul"] = {}
    with pytest.raises(UserError, match="random_ltd.random_ltd_schedul'"):
        translate(bad)
