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
import re
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


def _import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (anywhere in the file)."""
    files = {_module(p): p for p in _project_files()}
    return {module: {name for name in _imports(path) if name in files and name != module}
            for module, path in files.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle():
    circles = _circles(_import_graph())
    assert not circles, "\n".join(" <-> ".join(c) for c in circles)


def test_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


MAX_FUNCTION_LINES = 59


def _long_functions(source: str, label: str) -> list[str]:
    """'label:line name (n lines)' for each function in `source` longer than MAX_FUNCTION_LINES."""
    return [f"{label}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source, label)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_of_60_lines_or_more():
    long = [entry for path in _project_files()
            for entry in _long_functions(path.read_text(), str(path.relative_to(REPO)))]
    assert not long, "\n".join(long)


def test_long_function_finder():
    def function(name: str, lines: int) -> str:  # `lines` lines including the def line
        return f"def {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    source = function("fits", MAX_FUNCTION_LINES) + "\n\n" + function("too_long", MAX_FUNCTION_LINES + 1)
    assert [entry.split()[1] for entry in _long_functions(source, "x.py")] == ["too_long"]


# --- a model family is one folder -------------------------------------------------------------------

def _family_packages() -> list[str]:
    """The packages of the repository's model families (models/families.py)."""
    from models.families import FAMILY_MODULES
    return sorted({module.rsplit(".", 1)[0] for module in FAMILY_MODULES})


def _outside_families(path: Path) -> bool:
    """Modules that must not know a family: all but the family packages and the tests."""
    module = _module(path)
    return not _within(module, *_family_packages()) and not _within(module, "tests")


def test_no_module_outside_a_family_imports_one():
    packages = _family_packages()
    assert len(packages) >= 2
    offending = [f"{_module(p)} imports {name}" for p in _project_files() if _outside_families(p)
                 for name in sorted(_imports(p)) if _within(name, *packages)]
    assert not offending, "\n".join(offending)


def _family_words() -> tuple[set[str], set[str]]:
    """(names of the families: keys, labels, model-name prefixes; the classes their packages define)."""
    from models.families import FAMILIES
    names = {word for f in FAMILIES.values() for word in (f.name, f.label, f.prefix)}
    classes = {node.name for p in _project_files() if _within(_module(p), *_family_packages())
               for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef)}
    return names, classes


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _family_mentions(source: str, names: set[str], classes: set[str], allowed: set[str] = frozenset()) -> list[str]:
    """Where code (not docstrings or comments) names a family: an identifier that is one of its
    classes or has a family name as a word ("build_mn"), a string that is a family name, a family
    module or holds one of its classes or names as a word ("MN/DyMN strides", "DynamicConv")."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    modules = {f"models.{name}" for name in names}
    words = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names | classes, key=len, reverse=True))) + r")\b")
    found = []
    for node in ast.walk(tree):
        identifier = (getattr(node, "id", None) or getattr(node, "attr", None) or
                      (node.name if isinstance(node, (ast.alias, ast.ClassDef, ast.FunctionDef)) else None))
        if identifier and (identifier in classes or names & set(re.split(r"[_.]", identifier))):
            found.append(f"{node.lineno if hasattr(node, 'lineno') else '?'}: {identifier}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and node.value not in allowed and (words.search(node.value) or any(m in node.value for m in modules)):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_no_module_outside_a_family_names_one():
    from models.families import FAMILY_MODULES
    names, classes = _family_words()
    assert {"MN", "dymn"} <= names and {"InvertedResidual", "DynamicConv"} <= classes
    offending = [f"{p.relative_to(REPO)}:{where}" for p in _project_files() if _outside_families(p)
                 for where in _family_mentions(p.read_text(), names, classes, set(FAMILY_MODULES))]
    assert not offending, "\n".join(offending)


def test_family_mention_finder():
    names, classes = {"mn", "MN", "dymn", "DyMN"}, {"DynamicConv"}
    source = ('"""MN and DyMN: a docstring may name them."""\n'
              'import models.dymn.arch\nfrom x import build_mn\nDynamicConv\nif f == "mn": pass\n'
              'help = "MN/DyMN strides"\nlabel = "DynamicConv kernels"\nmodule = "models.mn.family"\n'
              'name = "mn10_as"\nmnemonic, common = 1, "dynamic"\n')
    found = sorted(entry.split(": ", 1)[1] for entry in _family_mentions(source, names, classes))
    assert found == sorted(["models.dymn.arch", "build_mn", "DynamicConv", "'mn'", "'MN/DyMN strides'",
                            "'DynamicConv kernels'", "'models.mn.family'"])
    assert _family_mentions('m = "models.mn.family"\n', names, classes, {"models.mn.family"}) == []
