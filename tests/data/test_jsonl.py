"""The atomic text writer: whole files only, with the permissions any new file gets."""

import os
import stat

import pytest

from jaxllm.data.jsonl import write_atomic


def test_write_atomic_replaces_whole_files_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    write_atomic(path, ['{"a": 1}\n'])
    write_atomic(path, ['{"a": 2}\n', '{"a": 3}\n'])
    assert path.read_text() == '{"a": 2}\n{"a": 3}\n'
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600

    def failing():
        yield '{"a": 4}\n'
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, failing())
    assert path.read_text() == '{"a": 2}\n{"a": 3}\n' and [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]
