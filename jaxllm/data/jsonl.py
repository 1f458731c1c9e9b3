"""JSON Lines input: the one line reader behind RLHF rows, VisualChat conversations and metrics files; and
the one atomic writer of the text files a crash must not leave half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jaxllm.errors import UserError


def jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed JSON) of each non-blank line of the UTF-8 file `path`.

    A line that is not JSON is a `UserError` naming the file and line; what a value must hold is the
    caller's to check (with the `file:line` it is given). Callers check that the file exists, as each
    names it in its own terms (a config key, a workdir).
    """
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from None
            yield where, value


def write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Writes `lines` (UTF-8) to a temporary file beside `path` and renames it into place, so readers see
    the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.chmod(tmp, new_file_mode())  # mkstemp makes a private (0600) file; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask (0o644 under the usual 022)."""
    mask = os.umask(0o022)  # the only way to read the umask is to set it; restored at once
    os.umask(mask)
    return 0o666 & ~mask
