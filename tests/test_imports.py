"""Import rules between packages, read from the source (ast), so a forbidden import fails here first.

- `pallas_kernels/` are leaves: from jaxllm they may import only `jaxllm.errors`.
- `jaxllm/models/` and `jaxllm/ops/` do not depend on features: nothing from `jaxllm.compression`.
- No module imports a command-line module (a command may forward to another command), or another
  module's private name; module imports form no cycle.
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


# The command-line modules: what they hold is for their command only.
COMMANDS = {"jaxllm.train", "jaxllm.compress", "jaxllm.compression.__main__", "jaxllm.generate.__main__",
            "jaxllm.rlhf.__main__", "jaxllm.multimodal.train", "jaxllm.multimodal.chat", "jaxllm.interop.convert",
            "jaxllm.plot"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in files("jaxllm") + files("pallas_kernels")}


def runtime_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def dependencies(name: str) -> set[str]:
    """The jaxllm / pallas_kernels modules `name` imports (`from a import b` is module `a.b` when it is one)."""
    out = set()
    for module, item in runtime_imports(MODULES[name]):
        target = f"{module}.{item}" if item and f"{module}.{item}" in MODULES else module
        if target in MODULES and target != name:
            out.add(target)
    return out


def test_no_module_imports_a_command_module():
    bad = {(name, dep) for name in MODULES if name not in COMMANDS for dep in dependencies(name) if dep in COMMANDS}
    assert not bad, sorted(bad)


def test_no_module_imports_another_modules_private_name():
    bad = [(name, f"{module}.{item}") for name, path in MODULES.items() for module, item in runtime_imports(path)
           if item and item.startswith("_") and module in MODULES and f"{module}.{item}" not in MODULES
           and module != name]
    assert not bad, bad


def test_module_imports_form_no_cycle():
    # A package importing its own submodules (to re-export them) is not a dependency of theirs on it.
    graph = {name: {d for d in dependencies(name) if not within(d, name)} for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path[path.index(dep):], dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
