"""Tests for jaxllm.data.corpus: the docstring corpus and the document reader."""

import ast
import json
from pathlib import Path

import pytest

from jaxllm.data import corpus
from jaxllm.data.corpus import build_stdlib_corpus, read_documents
from jaxllm.errors import UserError


def test_stdlib_corpus_is_deterministic_bounded_and_readable(tmp_path):
    a = build_stdlib_corpus(tmp_path / "a.jsonl", max_chars=30_000)
    b = build_stdlib_corpus(tmp_path / "b.jsonl", max_chars=30_000)
    assert a.read_bytes() == b.read_bytes()
    docs = read_documents(a)
    assert len(docs) > 10
    assert sum(map(len, docs)) <= 30_000
    assert len(set(docs)) == len(docs)
    assert all(doc.strip() == doc and doc for doc in docs)
    sources = [json.loads(line)["source"] for line in a.read_text().splitlines()]
    assert sources == sorted(sources, key=lambda s: s.split(".")[0])  # Modules in sorted order.
    assert not list(tmp_path.glob(".*.tmp"))


def test_docstrings_match_ast_of_the_source_and_skip_tests_and_guis():
    first = {}
    for source, text in corpus.iter_stdlib_docstrings():
        top = source.split(".")[0]
        assert top not in {"test", "idlelib", "tkinter", "turtledemo"} and not top.startswith("_")
        assert ".test." not in f".{source}." and ".tests." not in f".{source}."
        first.setdefault(top, text)
        if len(first) > 3:
            break
    import abc  # An independent reference: the interpreter's own module docstring.

    assert first["abc"] == abc.__doc__.strip() == ast.get_docstring(ast.parse(Path(abc.__file__).read_text()))


def test_txt_format_splits_on_form_feed_and_two_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first para\n\nstill first\n\n\nsecond\n\f\nthird line 1\nthird line 2\n  \n \n\n")
    assert read_documents(path) == ["first para\n\nstill first", "second", "third line 1\nthird line 2"]


def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one\\ntwo", "id": 1}\n\n{"text": "日本語"}\n')
    assert read_documents(path) == ["one\ntwo", "日本語"]


@pytest.mark.parametrize("name, content, needle", [
    ("missing.jsonl", None, "not found"),
    ("bad.jsonl", '{"text": "ok"}\n{nope\n', "bad.jsonl:2"),
    ("notext.jsonl", '{"body": "x"}\n', "notext.jsonl:1"),
    ("corpus.csv", "a,b\n", "allowed corpus formats"),
])
def test_bad_corpus_files_raise_user_error_naming_the_file(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle) as info:
        read_documents(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_cli_writes_corpus_and_rejects_bad_size(tmp_path, capsys):
    assert corpus.main([str(tmp_path / "c.jsonl"), "--max-chars", "2000"]) == 0
    assert read_documents(tmp_path / "c.jsonl")
    assert corpus.main([str(tmp_path / "d.jsonl"), "--max-chars", "0"]) == 2
    assert "max_chars" in capsys.readouterr().err
