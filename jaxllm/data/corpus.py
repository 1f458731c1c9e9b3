"""Plain-text corpora: an offline English corpus from standard-library docstrings, and a reader.

Two document formats are understood by :func:`read_documents`:

* ``.jsonl``: one JSON object per line with a string field ``"text"`` (other fields are ignored;
  blank lines are skipped). :func:`build_stdlib_corpus` writes this format.
* ``.txt``: documents are separated by a line holding only a form feed (``\\f``) or by two or more
  consecutive blank lines. A single blank line stays inside the document as a paragraph break.

Run ``python -m jaxllm.data.corpus OUT.jsonl [--max-chars N]`` to write the docstring corpus.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from jaxllm.data.jsonl import write_atomic
from jaxllm.errors import UserError, exit_status

# Top-level standard-library names whose sources are GUIs, demos, tests, vendored data or jokes.
SKIPPED_MODULES = frozenset({
    "antigravity", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "site-packages", "test",
    "this", "tkinter", "turtle", "turtledemo",
})
# Package subdirectories that hold tests rather than library code.
SKIPPED_DIRS = frozenset({"__pycache__", "test", "tests", "idle_test", "site-packages"})
MIN_DOC_CHARS = 32


def _module_files(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """Yields ``(dotted module name, source file)`` for the public stdlib, in sorted order."""
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIPPED_MODULES:
            continue
        single = stdlib / f"{name}.py"
        if single.is_file():
            yield name, single
            continue
        package = stdlib / name
        if not (package / "__init__.py").is_file():
            continue  # Built into the interpreter or a C extension: no source to parse.
        for root, dirs, files in os.walk(package):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            rel = Path(root).relative_to(stdlib).parts
            for file in sorted(f for f in files if f.endswith(".py")):
                stem = file[:-3]
                if stem.startswith("test_"):
                    continue
                parts = rel if stem == "__init__" else (*rel, stem)
                yield ".".join(parts), Path(root) / file


def _docstrings(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
    """Yields ``(qualified name, docstring)`` for a module and its classes and functions, in source order."""
    doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
    if doc:
        yield qualname, doc
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{qualname}.{child.name}")


def iter_stdlib_docstrings(stdlib: Path | None = None) -> Iterator[tuple[str, str]]:
    """Yields ``(source, text)`` for every distinct stdlib docstring of at least MIN_DOC_CHARS characters.

    Source files are parsed with ``ast`` and never imported. The order is fixed by the sorted module
    names and source order, so the same interpreter always gives the same sequence.
    """
    stdlib = Path(sysconfig.get_path("stdlib")) if stdlib is None else stdlib
    seen: set[str] = set()
    for module, path in _module_files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for source, text in _docstrings(tree, module):
            text = text.strip()
            if len(text) >= MIN_DOC_CHARS and text not in seen:
                seen.add(text)
                yield source, text


def build_stdlib_corpus(out_path: str | os.PathLike, max_chars: int = 2_000_000) -> Path:
    """Writes the standard-library docstring corpus as JSONL and returns its path.

    Args:
      out_path: file to write; one ``{"text": ..., "source": "module.Class.method"}`` object per line.
      max_chars: stop before the total text length would exceed this many characters.

    Returns:
      ``out_path`` as a ``Path``. The file appears atomically, complete or not at all.
    """
    if max_chars <= 0:
        raise UserError(f"max_chars: found {max_chars}; allowed: a positive number of characters")
    out = Path(out_path)

    def lines() -> Iterator[str]:
        total = 0
        for source, text in iter_stdlib_docstrings():
            if total + len(text) > max_chars:
                return
            total += len(text)
            yield json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"

    write_atomic(out, lines())
    return out


def _split_txt(text: str) -> list[str]:
    """Splits text on form-feed lines or runs of two or more blank lines (see module docstring)."""
    docs: list[str] = []
    current: list[str] = []
    blanks = 0

    def flush() -> None:
        doc = "\n".join(current).strip()
        if doc:
            docs.append(doc)
        current.clear()

    for line in text.replace("\r\n", "\n").split("\n"):
        bare = line.strip(" \t\r")
        if bare == "\f":
            flush()
            blanks = 0
        elif not bare:
            blanks += 1
        else:
            if blanks >= 2:
                flush()
            elif blanks == 1 and current:
                current.append("")
            blanks = 0
            current.append(line.rstrip())
    flush()
    return docs


def _read_jsonl(path: Path, text: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: found invalid JSON ({e.msg}); "
                            "allowed: one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{lineno}: found no string field 'text'; allowed: {{\"text\": \"...\"}}")
        docs.append(record["text"])
    return docs


def read_documents(path: str | os.PathLike) -> list[str]:
    """Reads the documents of a ``.jsonl`` or ``.txt`` corpus file (formats in the module docstring)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise UserError(f"{path}: found suffix '{path.suffix}'; allowed corpus formats: .jsonl, .txt")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: corpus file not found; allowed: an existing .jsonl or .txt file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read corpus file ({e}); "
                        "allowed: a readable UTF-8 text file") from None
    return _read_jsonl(path, text) if path.suffix == ".jsonl" else _split_txt(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: writes the docstring corpus."""
    parser = argparse.ArgumentParser(description="Write the standard-library docstring corpus (JSONL).")
    parser.add_argument("out", help="output .jsonl file")
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    args = parser.parse_args(argv)

    def run() -> None:
        path = build_stdlib_corpus(args.out, max_chars=args.max_chars)
        print(f"wrote {len(read_documents(path))} documents to {path}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
