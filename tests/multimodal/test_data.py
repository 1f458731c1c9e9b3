"""VisualChat data: template, label masking, placeholder order, concatenation, blending, bad input."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.multimodal import data as D
from jaxllm.multimodal.config import MultimodalConfig, VisionConfig
from jaxllm.multimodal.model import VisualChat

T = 5  # image tokens per image in these tests
VISION = VisionConfig(image_size=8, patch_size=4, d_model=16, layers=1, heads=2, d_ff=16, keep_class_token=True)


class CharTokenizer:
    """One id per byte (+4); pad 0, eos 3. Independent of SentencePiece, so texts can be compared exactly."""

    path = Path("chars")
    vocab_size, pad_id, unk_id, bos_id, eos_id = 260, 0, 1, 2, 3

    def encode(self, text):
        return [b + 4 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode()


TOK = CharTokenizer()


def write_images(directory: Path, colours: dict[str, tuple[int, int, int]]) -> None:
    for name, rgb in colours.items():
        Image.new("RGB", (8, 8), rgb).save(directory / f"{name}.png")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_template_text_types_and_labels():
    template = D.Template(TOK, T, system_prompt="Be brief.")
    turns = [D.Turn("<image>\n<image>\nWhich?", "first"), D.Turn("Why?", "no"), D.Turn("<image> And this?", "x")]
    sample = template.render([template.encode_turn(t) for t in turns], [Path("a"), Path("b"), Path("c")])
    text_ids = sample.ids[sample.types == 1]
    assert TOK.decode(text_ids) == (
        "Be brief.\n\n"
        "### Image 1:\n\n### Image 2:\n\n\n### Question:\nWhich?\n\n### Answer:\nfirst"
        "### Question:\nWhy?\n\n### Answer:\nno"
        "### Image 3:\n\n\n### Question:\nAnd this?\n\n### Answer:\nx")
    # Image slots: T per placeholder, right after each "### Image k:\n" header.
    assert (sample.types == 2).sum() == 3 * T
    full = "".join(chr(i - 4) if t == 1 and i >= 4 else ("#" if i == 3 else "@")
                   for i, t in zip(sample.ids, sample.types, strict=True))
    assert "### Image 1:\n" + "@" * T + "\n### Image 2:\n" + "@" * T + "\n\n" in full
    # Labels: exactly the answers and their EOS.
    labelled = sample.ids[sample.answer]
    assert list(labelled) == TOK.encode("first") + [3] + TOK.encode("no") + [3] + TOK.encode("x") + [3]


def test_rows_shift_targets_and_mask_only_answers(tmp_path):
    write_images(tmp_path, {"r": (255, 0, 0)})
    conv = D.parse_conversation({"images": ["r.png"], "turns": [{"question": "<image>\nQ?", "answer": "ab"}]},
                                "x:1", tmp_path)
    template = D.Template(TOK, VISION.tokens)
    (part,) = D.encode_conversations([conv], template, 64)
    sample = template.render(part.turns, part.images)
    row = D.to_row(sample, [D.load_image(p, VISION) for p in part.images], 64, 2, D.image_shape(VISION), 0)
    n = len(sample) - 1
    assert row["inputs"][:n].tolist() == sample.ids[:-1].tolist() and np.all(row["inputs"][n:] == 0)
    assert row["targets"][row["loss_mask"] == 1].tolist() == TOK.encode("ab") + [3]
    assert row["loss_mask"].sum() == 3 and row["token_types"][n:].sum() == 0
    assert row["image_count"] == 1 and np.all(row["images"][1] == 0)


def test_images_fill_placeholders_in_order(tmp_path):
    """Data: images in placeholder order, renumbered across concatenated samples; model: slot run k holds
    image k's projected tokens."""
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    write_images(tmp_path, colours)
    convs = [D.parse_conversation({"images": ["c.png", "a.png"], "turns": [
        {"question": "<image> then <image>", "answer": "1"}]}, "f:1", tmp_path),
        D.parse_conversation({"images": ["b.png"], "turns": [{"question": "<image>", "answer": "2"}]}, "f:2", tmp_path)]
    template = D.Template(TOK, VISION.tokens)
    parts = D.encode_conversations(convs, template, 200)
    rows = next(r for seed in range(50) if len((r := D.VisualChatRows([parts], [1.0], [2], template, VISION, 200, 3,
                                                                      seed=seed)).groups[0][0]) == 2)
    index = 0
    order = [p.conversation.source for p in rows.parts(index)]
    expected = {"f:1": ["c", "a"], "f:2": ["b"]}
    names = [n for src in order for n in expected[src]]
    row = rows[index]
    for k, name in enumerate(names):
        np.testing.assert_allclose(row["images"][k], D.load_image(tmp_path / f"{name}.png", VISION))
    text = TOK.decode(row["inputs"][row["token_types"] == 1])
    assert text.index("### Image 1:") < text.index("### Image 2:") < text.index("### Image 3:")

    model_cfg = ModelConfig(layers=1, d_model=16, heads=2, vocab_size=260, max_len=200)
    model = VisualChat(model_cfg, VISION, MultimodalConfig(), rngs=nnx.Rngs(params=0))
    batch = {k: jnp.asarray(v[None]) for k, v in row.items() if k in ("inputs", "token_types")}
    x = model.embed(batch["inputs"], batch["token_types"], jnp.asarray(row["images"][None]))
    runs = np.nonzero(np.asarray(batch["token_types"][0]) == 2)[0].reshape(3, VISION.tokens)
    for k in range(3):
        alone = model.projection(model.vision(jnp.asarray(row["images"][k][None])), jnp.float32)[0]
        np.testing.assert_allclose(np.asarray(x[0, runs[k]]), np.asarray(alone), atol=1e-5)


def test_blending_follows_the_ratios_on_every_prefix():
    ratios = [3.0, 1.0, 0.5]
    schedule = D.blend_schedule(ratios, 900)
    share = np.asarray(ratios) / sum(ratios)
    counts = np.zeros(3)
    for n, d in enumerate(schedule, 1):
        counts[d] += 1
        assert np.all(np.abs(counts - n * share) < 1.0 + 1e-9), (n, counts)
    assert counts.tolist() == [600, 200, 100]


def test_grouping_uses_each_conversation_once_within_the_limits(tmp_path):
    write_images(tmp_path, {"a": (9, 9, 9)})
    records = [{"images": ["a.png"] * (i % 3), "turns": [{"question": "<image>" * (i % 3) + "q" * (i % 7),
                                                          "answer": "a" * (1 + i % 4)}]} for i in range(40)]
    convs = D.read_conversations(write_jsonl(tmp_path / "c.jsonl", records))
    template = D.Template(TOK, VISION.tokens)
    parts = D.encode_conversations(convs, template, 150)
    groups = D.group_conversations(parts, 3, template, 150, 3, seed=5)
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert max(len(g) for g in groups) == 3 and min(len(g) for g in groups) == 1
    for g in groups:
        length, images = D.sample_length(template, [parts[i] for i in g])
        assert images <= 3 and length <= 151
        assert length == len(template.render([t for i in g for t in parts[i].turns],
                                             [p for i in g for p in parts[i].images]))
    assert groups == D.group_conversations(parts, 3, template, 150, 3, seed=5)


def test_blended_rows_draw_datasets_by_ratio(tmp_path):
    write_images(tmp_path, {"a": (1, 2, 3)})
    template = D.Template(TOK, VISION.tokens)
    sets = []
    for name, n in (("x", 5), ("y", 7)):
        recs = [{"images": ["a.png"], "turns": [{"question": f"<image>{name}", "answer": str(i)}]} for i in range(n)]
        sets.append(D.encode_conversations(D.read_conversations(write_jsonl(tmp_path / f"{name}.jsonl", recs)),
                                           template, 60))
    rows = D.VisualChatRows(sets, [1.0, 3.0], [1, 1], template, VISION, 60, 1, seed=0, samples=40)
    picked = [rows.parts(i)[0].conversation.source.split(":")[0].endswith("y.jsonl") for i in range(40)]
    assert sum(picked) == 30
    # Within a dataset, samples cycle through its groups: all 7 of y appear in its first 7 draws.
    ys = [rows.parts(i)[0].conversation.source for i in range(40) if picked[i]]
    assert len(set(ys[:7])) == 7


def test_bad_conversations_get_clear_errors(tmp_path):
    write_images(tmp_path, {"a": (1, 2, 3)})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one = {"images": ["a.png"], "turns": [{"question": "<image> q", "answer": "a"}]}
    cases = [
        ({"images": ["a.png"], "turns": [{"question": "<image><image> q", "answer": "a"}]},
         r"bad.jsonl:2: 2 '<image>' placeholder\(s\) in the questions but 1 image\(s\)"),
        ({"images": ["a.png", "a.png"], "turns": [{"question": "<image> q", "answer": "a"}]},
         r"1 '<image>' placeholder\(s\) in the questions but 2 image\(s\)"),
        ({"images": ["a.png"] * 9, "turns": [{"question": "<image>" * 9, "answer": "a"}]}, "9 images; at most 8"),
        ({"images": [], "turns": [{"question": "q", "answer": "<image>"}]}, "answer holds '<image>'"),
        ({"images": [], "turns": []}, "'turns' must be a non-empty list"),
        ({"images": [], "turns": [{"question": "q"}]}, "turn 0 must be"),
        ({"pictures": []}, "unknown key 'pictures'"),
    ]
    for record, message in cases:
        with pytest.raises(UserError, match=message):
            D.read_conversations(write_jsonl(tmp_path / "bad.jsonl", [one, record]))
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        D.read_conversations(write_jsonl(tmp_path / "bad.jsonl", ["{oops"]))
    with pytest.raises(UserError, match="3 images; at most 2"):
        D.read_conversations(write_jsonl(tmp_path / "bad.jsonl", [
            {"images": ["a.png"] * 3, "turns": [{"question": "<image>" * 3, "answer": "a"}]}]), max_images=2)
    broken = D.read_conversations(write_jsonl(tmp_path / "img.jsonl", [
        {"images": ["broken.png"], "turns": [{"question": "<image>", "answer": "a"}]}]))
    with pytest.raises(UserError, match=r"img.jsonl:1: image '.*broken.png' cannot be read"):
        D.verify_images(broken)
    with pytest.raises(UserError, match=r"image '.*broken.png' \(image of x:3\) cannot be read"):
        D.load_image(tmp_path / "broken.png", VISION, "x:3")
    missing = D.read_conversations(write_jsonl(tmp_path / "img.jsonl", [
        {"images": ["gone.png"], "turns": [{"question": "<image>", "answer": "a"}]}]))
    with pytest.raises(UserError, match="image '.*gone.png' does not exist"):
        D.verify_images(missing)


def test_sequences_over_the_limit_drop_whole_turns_or_fail(tmp_path):
    write_images(tmp_path, {"a": (1, 2, 3)})
    template = D.Template(TOK, VISION.tokens)
    conv = D.parse_conversation({"images": ["a.png", "a.png"], "turns": [
        {"question": "<image> first", "answer": "one"}, {"question": "<image> second", "answer": "two"}]},
        "long.jsonl:4", tmp_path)
    first = template.turn_length(template.encode_turn(conv.turns[0]), 0)
    (part,) = D.encode_conversations([conv], template, first + 5)
    assert part.dropped_turns == 1 and len(part.turns) == 1 and len(part.images) == 1
    (whole,) = D.encode_conversations([conv], template, 500)
    assert whole.dropped_turns == 0 and len(whole.images) == 2
    with pytest.raises(UserError, match=r"long.jsonl:4: the first turn alone takes \d+ tokens .* data.max_seq_len=20"):
        D.encode_conversations([conv], template, 20)


def test_images_are_resized_centre_cropped_and_normalised(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 48:] = (255, 0, 0)
    pixels[:, 16:48] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = D.load_image(tmp_path / "wide.png", VISION)
    assert out.shape == (8, 8, 3)
    green = (np.array([0.0, 1.0, 0.0]) - np.asarray(VISION.image_mean)) / np.asarray(VISION.image_std)
    np.testing.assert_allclose(out[:, 2:6], np.broadcast_to(green, (8, 4, 3)), atol=1e-5)  # the centre is green
    assert jax.numpy.allclose(out, D.load_image(tmp_path / "wide.png", VISION))  # deterministic
