"""The model families and the registry of released checkpoints, assembled from the family packages.

Each module listed in FAMILY_MODULES (and in the environment variable EFFICIENTAT_FAMILIES,
comma-separated, for families kept outside this repository and importable from sys.path)
defines `FAMILY`, a `models.family.Family`. Adding a family to the repository is its folder
`models/<family>/` and one line here. The first family listed is the default one: of model names
without a known prefix and of complexity.py --model_width.
"""
from __future__ import annotations

import importlib
import os

from models.family import Family, Option, PretrainedEntry

FAMILY_MODULES = (
    "models.mn.family",
    "models.dymn.family",
)
ENV_VAR = "EFFICIENTAT_FAMILIES"


def family_modules() -> list[str]:
    """FAMILY_MODULES, then those named in $EFFICIENTAT_FAMILIES."""
    extra = [m.strip() for m in os.environ.get(ENV_VAR, "").split(",") if m.strip()]
    return list(FAMILY_MODULES) + [m for m in extra if m not in FAMILY_MODULES]


def _load(module: str) -> Family:
    try:
        family = importlib.import_module(module).FAMILY
    except (ImportError, AttributeError) as e:
        source = f" (from ${ENV_VAR})" if module not in FAMILY_MODULES else ""
        raise ImportError(f"model family module {module!r}{source} does not define FAMILY: {e}") from e
    if not isinstance(family, Family):
        raise TypeError(f"{module}.FAMILY is a {type(family).__name__}, not a models.family.Family")
    return family


def _unique(pairs: list[tuple[str, object]], what: str) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result and result[key] != value:
            raise ValueError(f"two model families define the {what} {key!r} differently")
        result[key] = value
    return result


def load_families(modules: list[str]) -> dict[str, Family]:
    """Family name -> Family of the listed modules, in their order; ValueError for two families
    of one name or prefix, or two registry rows of one name."""
    families = [_load(m) for m in modules]
    for what, keys in (("name", [f.name for f in families]), ("prefix", [f.prefix for f in families])):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"two model families have the {what} {twice[0]!r}")
    names = [e.name for f in families for e in f.entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two registry rows are named {twice[0]!r}")
    return {f.name: f for f in families}


FAMILIES: dict[str, Family] = load_families(family_modules())
DEFAULT_FAMILY = next(iter(FAMILIES))
REGISTRY: dict[str, PretrainedEntry] = {e.name: e for f in FAMILIES.values() for e in f.entries}
# every family's options (the training scripts' family flags); a name two families share is one option
OPTIONS: dict[str, Option] = _unique([(n, o) for f in FAMILIES.values() for n, o in f.options.items()], "option")
