"""Configuration is typed below the scripts (docs/architecture.md, "Configuration"): the scripts
parse their flags and build the dataclass configs of `models/config.py` and
`helpers/training/config.py`; nothing below them takes, imports or builds an `argparse.Namespace`,
and no script changes its parsed flags afterwards or copies them for evaluation.

The one exception is argparse's own hooks (`Action.__call__`, `ArgumentParser.parse_args`
overrides in classes that subclass argparse's): they are the parsing itself.
Also: what the configs build from flags, and that they are frozen."""
from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from tests.conftest import REPO

BELOW_SCRIPTS = ("common", "models", "datasets", "helpers")
FLAG_PARAMETERS = {"args", "opts"}  # what parsed flags are called when they are passed on


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _argparse_hooks(tree: ast.Module) -> set[ast.AST]:
    """The methods of classes subclassing an argparse class (their nodes and everything in them)."""
    hooks: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name) and b.value.id == "argparse"
                for b in node.bases):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    hooks.update(ast.walk(item))
    return hooks


def namespace_uses(path: Path) -> list[str]:
    """Where module `path` names argparse.Namespace, imports it, or has a function parameter that
    carries parsed flags, outside argparse's own hooks."""
    tree = ast.parse(path.read_text(), str(path))
    hooks = _argparse_hooks(tree)
    found = []
    for node in ast.walk(tree):
        if node in hooks:
            continue
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module == "argparse" and any(
                a.name == "Namespace" for a in node.names):
            found.append(f"{where} imports Namespace")
        elif isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(f"{where} names argparse.Namespace")
        elif isinstance(node, ast.Name) and node.id == "Namespace":
            found.append(f"{where} names Namespace")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            named = [a.arg for a in node.args.args + node.args.kwonlyargs if a.arg in FLAG_PARAMETERS]
            found += [f"{where} {node.name}() takes parsed flags as {name!r}" for name in named]
    return found


def flag_changes(path: Path) -> list[str]:
    """Where script `path` changes or copies its parsed flags (`args`) after parsing."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "args":
                found.append(f"{where} sets args.{target.attr}")
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0] if node.args else None
            if name in ("setattr", "copy", "deepcopy", "replace") and isinstance(first, ast.Name) and first.id == "args":
                found.append(f"{where} {name}(args, ...)")
            if name == "Namespace":
                found.append(f"{where} builds a Namespace")
    return found


def test_nothing_below_the_scripts_takes_or_imports_a_namespace() -> None:
    found = [use for path in _files(*BELOW_SCRIPTS) for use in namespace_uses(path)]
    assert not found, "\n".join(found)


def test_no_script_changes_or_copies_its_parsed_flags() -> None:
    scripts = sorted(REPO.glob("*.py")) + _files("benchmarks")
    found = [change for path in scripts for change in flag_changes(path)]
    assert not found, "\n".join(found)


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The two checks above are not vacuous: each finds every kind of use it names."""
    bad = tmp_path / "probe.py"
    bad.write_text("import argparse\nfrom argparse import Namespace\n\n"
                   "def f(args: argparse.Namespace) -> None:\n    args.x = 1\n    setattr(args, 'y', 2)\n\n"
                   "def g(values):\n    return argparse.Namespace(**values)\n\n"
                   "class A(argparse.Action):\n"
                   "    def __call__(self, parser, namespace: argparse.Namespace, values, option_string=None):\n"
                   "        setattr(namespace, self.dest, values)\n")
    uses, changes = namespace_uses(bad), flag_changes(bad)
    assert sorted(uses) == ["probe.py:2 imports Namespace", "probe.py:4 f() takes parsed flags as 'args'",
                            "probe.py:4 names argparse.Namespace", "probe.py:9 names argparse.Namespace"]
    assert [c.split(" ", 1)[1] for c in changes] == ["sets args.x", "setattr(args, ...)", "builds a Namespace"]


def _frozen(config: object) -> None:
    field = dataclasses.fields(config)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, None)


def test_training_config_from_the_fine_tuning_flags() -> None:
    """A fine-tuning script's flags as the typed configuration: each group where it belongs,
    the family options in one mapping, --no_roll/--no_wavmix as switches, the flags kept as given."""
    from helpers.training.args import finetune_parser
    from helpers.training.config import TrainingConfig
    parser = finetune_parser("x", experiment_name="X", batch_size=8, lr=1e-4, dataset_env="X_DIR")
    config = TrainingConfig.from_flags(vars(parser.parse_args([
        "--pretrained_name", "mn04_as", "--fmin", "50", "--no_roll", "--batch_size", "4", "--lr", "0.01", "--channels_last", "--embedding_cache", "", "--seed", "3", "--se_dims", "cf"])))
    assert config.model.name == "mn04_as" and config.model.pretrained and config.model.options["se_dims"] == "cf"
    assert set(config.model.options) == {"se_dims", "pretrain_final_temp"}
    assert config.frontend.fmin == 50.0 and config.frontend_settings()["fmin"] == 50.0
    assert config.loader.batch_size == 4 and config.optim.lr == 0.01 and config.speed.channels_last
    assert not config.data.roll and config.data.wavmix and config.data.gain_augment == 12
    assert config.recipe.embedding_cache is None and config.run.seed == 3 and config.run.out_dir == Path("runs/X")
    assert config.flags["se_dims"] == "cf" and config.model.to_dict(10)["se_dims"] == "cf"
    for part in (config, config.model, config.frontend, config.optim, config.loader, config.speed, config.run,
                 config.data, config.recipe):
        _frozen(part)
    with pytest.raises(TypeError):
        config.flags["seed"] = 4  # type: ignore[index]


def test_training_frontend_starts_at_0_hz_without_fmin() -> None:
    from helpers.training.config import TrainingConfig
    from models.config import FrontendConfig, ModelConfig
    config = TrainingConfig(ModelConfig("mn10_as_mels_64"), FrontendConfig(fmax_aug_range=1000))
    assert config.frontend_settings()["fmin"] == 0.0 and config.frontend_settings()["n_mels"] == 64
    assert config.frontend_settings()["fmax_aug_range"] == 1000


def test_argparse_hooks_are_the_only_exception() -> None:
    """The exempted hooks are those of real argparse subclasses, and they exist (else the exception is dead)."""
    from common.flags import OldSpelling
    from helpers.training.args import TrainingParser
    assert issubclass(OldSpelling, argparse.Action) and issubclass(TrainingParser, argparse.ArgumentParser)
