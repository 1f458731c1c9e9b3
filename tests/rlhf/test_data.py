"""RLHF data: DeepSpeed-Chat's data_split, JSONL validation, fixed-shape rows with their masks, and the
config schema's errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.errors import UserError
from jaxllm.rlhf import config as config_lib
from jaxllm.rlhf import synthetic
from jaxllm.rlhf.data import PairRows, PromptRows, Record, SFTRows, read_records, read_text_rows, split_indices

EOS, PAD = 3, 0


class CharTokenizer:
    """One id per character: a-z -> 4..29, space -> 30, anything else -> 31; pad 0, EOS 3."""

    path = Path("chars")
    vocab_size, pad_id, unk_id, bos_id, eos_id = 32, PAD, 1, 2, EOS

    def encode(self, text):
        return [4 + ord(c) - ord("a") if "a" <= c <= "z" else 30 if c == " " else 31 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 4 + ord("a")) if 4 <= i < 30 else " " for i in ids)


def rec(prompt, chosen=None, rejected=None, response=None, where="t:1"):
    return Record(prompt, chosen, rejected, response, where)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("size,sizes", [(10, [2, 4, 4]), (7, [1, 3, 3]), (9, [1, 4, 4]), (3, [1, 1, 1])])
def test_data_split_sizes_follow_deepspeed_rounding(size, sizes):
    # 9 rows: rounded cumulative sums [0, 2, 6, 10] overshoot by 1, taken off every boundary after
    # the first, so step 1 gets one row: [0, 1, 5, 9] (DeepSpeed-Chat's get_raw_dataset_split_index).
    parts = split_indices(size, "2,4,4", 1234)
    assert [len(p) for p in parts] == sizes
    order = np.arange(size, dtype=np.uint32)
    np.random.RandomState(1234).shuffle(order)
    np.testing.assert_array_equal(np.concatenate(parts), order)


def test_data_split_weights_need_not_sum_to_ten():
    assert [len(p) for p in split_indices(100, "1,0,1", 0)] == [50, 0, 50]


# ----------------------------------------------------------------------------------------- JSONL


@pytest.mark.parametrize("line,message", [
    ("{not json", "t.jsonl:2: not valid JSON"),
    ('["a"]', "t.jsonl:2: expected a JSON object"),
    ('{"chosen": "x"}', "t.jsonl:2: 'prompt' is missing"),
    ('{"prompt": ""}', "t.jsonl:2: 'prompt' is empty"),
    ('{"prompt": "a", "chosen": 3}', "t.jsonl:2: 'chosen' must be a string"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(UserError, match=message):
        read_records(str(path))


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(UserError, match="config key 'data.path': file '.*nope.jsonl' does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("record,message", [
    (rec("ab", chosen="", rejected="c", where="f:7"), "f:7: 'chosen' is empty"),
    (rec("ab", chosen="x", rejected="   ", where="f:8"), "f:8: 'rejected' is empty"),
    (rec("ab", chosen="x", where="f:9"), "f:9: 'rejected' is missing"),
])
def test_empty_or_missing_answers_are_refused(record, message):
    with pytest.raises(UserError, match=message):
        PairRows([record], CharTokenizer(), 16)


def test_empty_sft_response_is_refused():
    with pytest.raises(UserError, match="f:3: 'response' is empty"):
        SFTRows.from_records([rec("ab", response="", chosen="x", where="f:3")], CharTokenizer(), 16)


# ----------------------------------------------------------------------------------------- rows


def test_sft_rows_mask_the_prompt_by_default():
    rows = SFTRows.from_records([rec("ab", chosen="cd")], CharTokenizer(), 8)  # no response: chosen
    a, b, c, d = 4, 5, 6, 7
    np.testing.assert_array_equal(rows.inputs[0], [a, b, c, d, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(rows.targets[0], [b, c, d, EOS, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(rows.segment_ids[0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 3, 4, 0, 0, 0])
    # targets c, d, EOS are the answer; target b is a prompt token
    np.testing.assert_array_equal(rows.loss_mask[0], [0, 1, 1, 1, 0, 0, 0, 0])
    full = SFTRows.from_records([rec("ab", response="cd", chosen="zz")], CharTokenizer(), 8, loss_on_prompt=True)
    np.testing.assert_array_equal(full.loss_mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(full.inputs[0], rows.inputs[0])  # response wins over chosen


def test_sft_rows_cut_long_answers_and_drop_prompts_that_fill_the_row():
    records = [rec("ab", response="cdefgh"), rec("abcdef", response="x"), rec("a", response="b")]
    rows = SFTRows.from_records(records, CharTokenizer(), 6)
    assert len(rows) == 2 and rows.report.truncated == 1 and rows.report.dropped == 1
    np.testing.assert_array_equal(rows.inputs[0], [4, 5, 6, 7, 8, 9])  # cut: no EOS fits
    np.testing.assert_array_equal(rows.loss_mask[0], [0, 1, 1, 1, 1, 0])
    assert "2 of 3 rows kept; 1 answers cut" in rows.report.line() and "1 dropped" in rows.report.line()


def test_pair_rows_share_the_prompt_and_end_with_eos():
    pairs = PairRows([rec("ab", chosen="cd", rejected="e")], CharTokenizer(), 8)
    np.testing.assert_array_equal(pairs.chosen[0], [4, 5, 6, 7, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(pairs.rejected[0], [4, 5, 8, EOS, PAD, PAD, PAD, PAD])
    assert (pairs.chosen_length[0], pairs.rejected_length[0]) == (5, 4)


def test_prompt_rows_left_pad_and_drop_over_long_prompts_with_a_count():
    records = [rec("abc"), rec("abcdefgh"), rec("a"), rec("abcdefghij")]
    prompts = PromptRows(records, CharTokenizer(), 4)
    np.testing.assert_array_equal(prompts.prompt, [[PAD, 4, 5, 6], [PAD, PAD, PAD, 4]])
    np.testing.assert_array_equal(prompts.prompt_length, [3, 1])
    assert prompts.report.dropped == 2
    assert prompts.report.line() == ("ppo: 2 of 4 rows kept; 2 dropped: prompt longer than "
                                     "data.max_prompt_seq_len=4 tokens")


def test_ptx_text_rows(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "abc"}, {"text": "d"}])
    rows = read_text_rows(path, CharTokenizer(), 5)
    np.testing.assert_array_equal(rows.loss_mask, [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    write_jsonl(tmp_path / "bad.jsonl", [{"txt": "abc"}])
    with pytest.raises(UserError, match="bad.jsonl:1: expected an object with a non-empty string 'text'"):
        read_text_rows(tmp_path / "bad.jsonl", CharTokenizer(), 5)


# ----------------------------------------------------------------------------------------- synthetic task


def test_synthetic_rule_and_rows():
    assert synthetic.rule_score("say cat but never dog:", "sun cat red") == 1.0
    assert synthetic.rule_score("say cat but never dog:", "cat dog red") == 0.0
    assert synthetic.rule_score("reply with cat, without dog:", "i do not know") == 0.0
    rows = synthetic.make_rows(400, 0)
    assert all(synthetic.rule_score(r["prompt"], r["chosen"]) == 1.0 for r in rows)
    assert all(synthetic.rule_score(r["prompt"], r["rejected"]) == 0.0 for r in rows)
    helpful = np.mean([synthetic.rule_score(r["prompt"], r["response"]) for r in rows])
    assert 0.25 < helpful < 0.45  # the demonstrator is right about a third of the time
    assert rows == synthetic.make_rows(400, 0)


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,message", [
    (["ppo.kl_clt=0.2"], "unknown config key 'ppo.kl_clt'; did you mean 'ppo.kl_ctl'"),
    (["data.data_split=2,4"], "config key 'data.data_split': got '2,4'"),
    (["ppo.train_batch_size=5"], "config key 'ppo.train_batch_size': got 5; expected a divisor"),
    (["ppo.cliprange=0"], "config key 'ppo.cliprange'"),
    (["optimizer.name=sgd"], "config key 'optimizer.name'"),
    (["ppo.only_optimize_lora=true"], "config key 'ppo.only_optimize_lora'"),
    (["data.source=jsonl"], "config key 'data.path'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        config_lib.load(None, overrides)


def test_deepspeed_chat_defaults():
    c = config_lib.load(None, [])
    p = c.ppo
    assert (p.kl_ctl, p.clip_reward_value, p.cliprange, p.cliprange_value, p.gamma, p.lam) == (0.1, 5.0, 0.2, 0.2,
                                                                                               1.0, 0.95)
    assert (p.unsup_coef, p.ema_beta, p.ppo_epochs, p.generation_batches) == (27.8, 0.992, 1, 1)
    assert (p.actor_learning_rate, p.critic_learning_rate, p.temperature) == (9.65e-6, 5e-6, 0.0)
    assert c.data.data_split == "2,4,4" and c.data.split_seed == 1234 and not c.sft.loss_on_prompt
