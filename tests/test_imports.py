"""Import rules between packages, read from the source (ast), so a forbidden import fails here first.

- `pallas_kernels/` are leaves: from jaxllm they may import only `jaxllm.errors`.
- `jaxllm/models/` and `jaxllm/ops/` do not depend on features: nothing from `jaxllm.compression`.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every name a file imports, at any depth (function-local imports included), as an absolute dotted
    path: `import a.b` -> `a.b`, `from a import b` -> `a.b` (so `from jaxllm import ops` is seen too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(folder: str) -> list[Path]:
    found = sorted((REPO / folder).rglob("*.py"))
    assert found, folder
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("path", files("pallas_kernels"), ids=lambda p: p.name)
def test_kernels_import_only_errors_from_jaxllm(path):
    from_jaxllm = {n for n in imported_modules(path) if within(n, "jaxllm")}
    assert all(within(n, "jaxllm.errors") for n in from_jaxllm), (path, from_jaxllm)


@pytest.mark.parametrize("path", files("jaxllm/models") + files("jaxllm/ops"), ids=lambda p: str(p.relative_to(REPO)))
def test_models_and_ops_do_not_import_compression(path):
    bad = {n for n in imported_modules(path) if within(n, "jaxllm.compression")}
    assert not bad, (path, bad)
