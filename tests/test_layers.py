"""The package's layers: each imports only the layers below it, and nothing below the application imports Hydra,
Typer or rich. Read from the source (every import statement, also those inside functions), so that an import made
only on some path is caught too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "snnbench"
# lowest first; a module may import its own layer and those before it. errors.py is the base every layer shares;
# the package's __init__ (the Python API) stands on the library layers, below the application.
LAYERS = ["errors", "io", "models", "core", "simulation", "conversion", "api", "app"]
APPLICATION_ONLY = ("hydra", "typer", "rich")


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside snnbench ("snnbench" itself is the API)."""
    parts = module.split(".")
    if parts == ["snnbench"] or parts[1] in ("__init__", "__main__"):
        return "api" if parts[-1] != "__main__" else "app"
    if parts[1] == "methods":  # snnbench.methods: the methods' typed knobs, as the API offers them
        return "api"
    return parts[1].removesuffix(".py")


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a source file, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            found.append((node.lineno, base))
            if base == "snnbench":  # `from snnbench import core`: the names may be subpackages
                found += [(node.lineno, f"snnbench.{alias.name}") for alias in node.names
                          if (PACKAGE / alias.name).exists() or (PACKAGE / f"{alias.name}.py").exists()]
    return found


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        layer = layer_of(module if module != "snnbench" else "snnbench")
        if path.name == "__main__.py" and path.parent == root:
            layer = "app"
        rank = LAYERS.index(layer)
        for line, imported in imports(path, module):
            top = imported.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line}"
            if top in APPLICATION_ONLY and layer != "app":
                problems.append(f"{where} ({layer}) imports {imported}, which only the application may")
            if top == "snnbench" and imported != "snnbench":
                target = layer_of(imported)
                if LAYERS.index(target) > rank:
                    problems.append(f"{where} ({layer}) imports {imported} ({target}), a higher layer")
    return problems


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path, PACKAGE)
        assert module == "snnbench" or module == "snnbench.__main__" or layer_of(module) in LAYERS, path


def test_no_layer_imports_a_higher_one():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("planted, expected", [
    ("core/planted.py", "imports snnbench.app (app), a higher layer"),
    ("simulation/planted.py", "imports snnbench.app (app), a higher layer"),
])
def test_a_planted_upward_import_is_caught(tmp_path, planted, expected):
    import shutil

    copy = tmp_path / "snnbench"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "conf"))
    (copy / planted).write_text("def late():\n    from snnbench.app import pipeline\n    return pipeline\n")
    found = violations(copy)
    assert len(found) == 1 and expected in found[0] and planted in found[0]


def test_a_planted_rich_import_in_the_core_is_caught(tmp_path):
    import shutil

    copy = tmp_path / "snnbench"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "conf"))
    (copy / "core" / "planted.py").write_text("import rich.console\n")
    found = violations(copy)
    assert len(found) == 1 and "imports rich.console, which only the application may" in found[0]
