"""Regex rules over module paths and the DeepSpeed `compression_training` translator."""

import pytest

from jaxllm.compression.rules import Rule, from_deepspeed, model_modules, module_shapes, plan
from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.models.definition import ModelDef

CFG = ModelConfig(family="gpt2", layers=2, d_model=32, heads=4, vocab_size=64, max_len=16)
SHAPES = module_shapes(ModelDef.from_config(CFG).shapes, CFG)

# DeepSpeedExamples model_compression/gpt2/config/ds_config_W4or8A8_Qgroup64_fp16.json (its compression part)
DS_W4OR8A8 = {
    "train_batch_size": 8,
    "compression_training": {
        "weight_quantization": {
            "shared_parameters": {"enabled": True, "quantizer_kernel": False, "schedule_offset": 0,
                                  "quantize_groups": 8, "quantize_verbose": False, "quantization_type": "symmetric",
                                  "quantize_weight_in_forward": False, "rounding": "nearest",
                                  "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 1}},
            "different_groups": {
                "wq1": {"params": {"start_bits": 4, "target_bits": 4, "quantization_period": 0},
                        "modules": ["mlp.c_fc", "mlp.c_proj"]},
                "wq2": {"params": {"start_bits": 8, "target_bits": 8, "quantization_period": 0},
                        "modules": ["attn.c_attn", "attn.c_proj"]}}},
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "quantization_type": "symmetric", "range_calibration": "dynamic",
                                  "schedule_offset": 0},
            "different_groups": {"aq1": {"params": {"bits": 8},
                                         "modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}}}}}


def test_module_table():
    names = [m.name for m in model_modules(CFG)]
    assert names[:3] == ["embed", "blocks.0.attn.wq", "blocks.0.attn.wk"]
    assert "blocks.1.mlp.w_out" in names and "head" not in names  # gpt2 ties its head to the embedding
    llama = ModelConfig(family="llama", layers=1, d_model=32, heads=4, vocab_size=64)
    hf = {m.name: m.hf_name for m in model_modules(llama)}
    assert hf["blocks.0.mlp.w_gate"] == "model.layers.0.mlp.gate_proj" and hf["head"] == "lm_head"


def test_rules_match_paths_and_hugging_face_names_later_rules_override():
    rules = [Rule((r"attn\.w[qkvo]$",), weight_bits=8, weight_groups=4, act_bits=8, name="attn"),
             Rule(("mlp.c_fc", "mlp.c_proj"), weight_bits=4, weight_groups=2, weight_symmetric=False, name="mlp"),
             Rule((r"blocks\.1\.attn\.wo",), weight_bits=2, name="override"),
             Rule(("wte",), weight_bits=8, name="embedding")]
    specs = plan(CFG, rules, SHAPES)
    assert set(specs) == {"embed"} | {f"blocks.{i}.{m}" for i in range(2) for m in
                                      ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_in", "mlp.w_out")}
    assert (specs["blocks.0.attn.wo"].weight_bits, specs["blocks.0.attn.wo"].contract) == (8, 2)
    wo = specs["blocks.1.attn.wo"]  # weights overridden, activations kept from the first rule
    assert (wo.weight_bits, wo.weight_groups, wo.act_bits) == (2, 1, 8)
    w_in = specs["blocks.0.mlp.w_in"]
    assert (w_in.weight_bits, w_in.weight_groups, w_in.weight_symmetric, w_in.act_bits) == (4, 2, False, None)
    embed = specs["embed"]  # one group per vocabulary row, no activation quantization, DeepSpeed's own layout
    assert (embed.weight_groups, embed.transposed, embed.act_bits) == (64, False, None)


def test_rule_matching_nothing_warns_and_lists_modules():
    with pytest.warns(UserWarning, match=r"match no module: 'typo' \('self_attn\.q_proj'\).*blocks\.0\.attn\.wq.*"
                                         r"transformer\.h\.0\.attn\.c_attn"):
        specs = plan(CFG, [Rule(("self_attn.q_proj",), weight_bits=8, name="typo"),
                           Rule(("mlp",), weight_bits=8, name="ok")], SHAPES)
    assert len(specs) == 4


def test_bad_rules():
    with pytest.raises(UserError, match="'r': weight_bits: got 9; expected an integer from 1 to 8"):
        Rule(("attn",), weight_bits=9, name="r")
    with pytest.raises(UserError, match="act_bits: got 0"):
        Rule(("attn",), act_bits=0, name="r")
    with pytest.raises(UserError, match="invalid"):
        Rule(("attn(",), weight_bits=8, name="r")
    with pytest.raises(UserError, match="non-empty list"):
        Rule((), weight_bits=8, name="r")
    # 5 groups do not divide the 32 x 32 query weight
    with pytest.raises(UserError, match=r"'blocks\.0\.attn\.wq' \(32, 4, 8\): weight groups: 5 groups do not divide"):
        plan(CFG, [Rule((r"attn\.wq",), weight_bits=8, weight_groups=5)], SHAPES)


def test_deepspeed_w4or8a8_recipe():
    recipe = from_deepspeed(DS_W4OR8A8)
    specs = plan(CFG, recipe.rules, SHAPES)
    for i in range(2):
        for m in ("wq", "wk", "wv", "wo"):
            s = specs[f"blocks.{i}.attn.{m}"]
            assert (s.weight_bits, s.weight_groups, s.act_bits, s.act_static) == (8, 8, 8, False)
        for m in ("w_in", "w_out"):
            s = specs[f"blocks.{i}.mlp.{m}"]
            assert (s.weight_bits, s.weight_groups, s.act_bits) == (4, 8, 8)
    assert "embed" not in specs and recipe.teacher_layers is None


def test_deepspeed_layer_reduction_static_asymmetric():
    recipe = from_deepspeed({
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "quantization_type": "asymmetric", "range_calibration": "static"},
            "different_groups": {"a": {"params": {"bits": 4}, "modules": ["mlp"]}}},
        "layer_reduction": {"enabled": True, "keep_number_layer": 2, "module_name_prefix": "transformer.h",
                            "teacher_layer": [1, 3], "other_module_name": ["transformer.wte"]}})
    assert recipe.teacher_layers == (1, 3)
    (rule,) = recipe.rules
    assert (rule.act_bits, rule.act_symmetric, rule.act_static, rule.weight_bits) == (4, False, True, None)


@pytest.mark.parametrize("section,message", [
    ({"weight_quantization": {"shared_parameters": {"enabled": True},
                              "different_groups": {"g": {"params": {"target_bits": 8}, "modules": ["attn"]}}}},
     "'weight_quantization.different_groups.g.params': required key 'start_bits' is missing"),
    ({"weight_quantization": {"shared_parameters": {"enabled": True, "quantize_group": 4}}},
     "unknown key 'quantize_group'"),
    ({"weight_quantization": {"shared_parameters": {"enabled": True, "rounding": "stochastic"}}},
     "rounding': got 'stochastic'"),
    ({"sparse_pruning": {"shared_parameters": {"enabled": True}}}, "pruning is not supported"),
    ({"layer_reduction": {"enabled": True, "keep_number_layer": 3, "teacher_layer": [0, 2]}},
     "keep_number_layer': got 3; expected len\\(teacher_layer\\) = 2"),
    ({"weight_quantization": {"shared_parameters": {"enabled": True},
                              "different_groups": {"g": {"params": {"start_bits": 8, "target_bits": 12},
                                                         "modules": ["attn"]}}}}, "target_bits': got 12"),
])
def test_deepspeed_config_errors(section, message):
    with pytest.raises(UserError, match=message):
        from_deepspeed({"compression_training": section})


def test_deepspeed_config_without_compression_section():
    with pytest.raises(UserError, match="no 'compression_training' section"):
        from_deepspeed({"train_batch_size": 8, "optimizer": {"type": "Adam"}})
    assert from_deepspeed({"train_batch_size": 8, "compression_training": {}}).rules == ()
