"""The packages import only downwards (README, Layout):

    0  common                               imports no other project module
    1  models, datasets                     common (and themselves; not each other)
    2  helpers.training, helpers.inference, layers 0-1 and layer 2, never a script
       helpers.analysis
    3  root scripts, benchmarks, tests       anything

Checked by walking the import statements of every project .py file (also imports inside
functions)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SKIP = {".git", "resources", "__pycache__", "runs", ".venv", "venv"}
SCRIPTS = {p.stem for p in REPO.glob("*.py")}
LAYER2 = ("helpers.training", "helpers.inference", "helpers.analysis")


def _project_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP & set(p.relative_to(REPO).parts))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    roots = {"common", "helpers", "models", "datasets", "tests", "benchmarks"} | SCRIPTS
    return {n for n in names if n.split(".")[0] in roots}


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _allowed(module: str, imported: str) -> bool:
    if _within(module, "common"):
        return _within(imported, "common")
    if _within(module, "models"):
        return _within(imported, "common", "models")
    if _within(module, "datasets"):
        return _within(imported, "common", "datasets")
    if _within(module, *LAYER2):
        return _within(imported, "common", "models", "datasets", *LAYER2)
    if _within(module, "helpers"):  # helpers/__init__.py and any other helpers module
        return _within(imported, "common")
    if module in SCRIPTS:  # scripts use the library, not each other
        return imported.split(".")[0] not in SCRIPTS | {"tests", "benchmarks"}
    return True  # tests and benchmarks sit on top


def test_every_import_goes_downwards():
    files = _project_files()
    assert len(files) > 50
    upward = [f"{_module(p)} imports {name}" for p in files for name in sorted(_imports(p))
              if not _allowed(_module(p), name)]
    assert not upward, "\n".join(upward)


def test_helpers_init_is_empty():
    assert (REPO / "helpers" / "__init__.py").read_text().strip() == ""


@pytest.mark.parametrize("module, imported, ok", [
    ("common.errors", "datasets.audio", False),
    ("models.pretrained", "common.download", True),
    ("models.pretrained", "helpers.inference.tagging", False),
    ("models.factory", "datasets.items", False),
    ("datasets.audio", "models.preprocess", False),
    ("helpers.training.loop", "datasets.items", True),
    ("helpers.inference.tagging", "inference", False),
    ("ex_esc50", "ex_audioset", False),
])
def test_rules(module: str, imported: str, ok: bool):
    assert _allowed(module, imported) == ok
