"""The web page's models: which ones it offers, and the one place where it loads them.

The picker offers the shipped model, every AudioSet model of the registry whose checkpoint is
already in the cache, and the references given to demo.py (a fine-tuned checkpoint, an ONNX
export, an ensemble); the page never downloads. A registry model that is not there is listed too,
marked, and choosing it gives one line saying how to get it (`missing_model`).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

from common.download import SHIPPED_DIR, cache_dir
from helpers.inference.resolve import RuntimeConfig, resolve_model
from helpers.inference.tagging import LoadedModel
from models.pretrained import DEFAULT_MODEL, REGISTRY, get_entry

logger = logging.getLogger(__name__)

# registry models listed in the picker even when not downloaded (the README's table)
LISTED = ("mn01_as", "mn02_as", "mn04_as", "mn05_as", "mn10_as", "mn20_as", "mn30_as", "mn40_as",
          "mn40_as_ext", "dymn04_as", "dymn10_as", "dymn20_as")
KEEP_LOADED = 3  # models held in memory at once (the least recently used one is let go)
# a loaded model as the commands use it (the windows, events and live loop take it)
Model = LoadedModel


def is_available(name: str) -> bool:
    """True for a registry name whose checkpoint is shipped or in the cache (no download needed)."""
    entry = REGISTRY[name]
    return (SHIPPED_DIR / entry.filename).is_file() or (cache_dir() / entry.filename).is_file()


def missing_model(reference: str) -> Optional[str]:
    """One line saying how to get a registry model that is neither shipped nor cached (None if it
    is there, or if `reference` is not a registry name)."""
    if reference not in REGISTRY or is_available(reference):
        return None
    entry = get_entry(reference)
    return (f"{reference} is not downloaded: run `python inference.py --model_name {reference} --audio_path "
            f"resources/demo_bells.wav` once with network, or put {entry.url} into {cache_dir()}, then reload "
            "this page")


def model_choices(extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(label, reference) pairs for the picker: the models there are first (the shipped one, the
    cached ones, `extra`), then the listed registry models still to download."""
    def label(name: str) -> str:
        entry = REGISTRY[name]
        where = "shipped" if (SHIPPED_DIR / entry.filename).is_file() else "cached"
        return f"{name} ({where}, mAP {entry.map:g})" if entry.map else f"{name} ({where})"

    there = [n for n in REGISTRY if REGISTRY[n].audioset and is_available(n)]
    choices = [(label(n), n) for n in sorted(there, key=lambda n: (n != DEFAULT_MODEL, n))]
    choices += [(f"{Path(e).name} (given to demo.py)", e) for e in extra if e not in there]
    choices += [(f"{n} (not downloaded)", n) for n in LISTED if n not in there]
    return choices


def load(reference: str) -> Model:
    """The one place the page loads a model: a registry name, checkpoint, ONNX file or "a+b"
    ensemble, through the resolver the commands use."""
    members = reference.split("+")
    return resolve_model(members if len(members) > 1 else reference, RuntimeConfig())


class Taggers:
    """Loaded models by reference, shared by every browser session (a model is read-only while it
    tags, so sessions can use one at the same time); `get` loads one once."""

    def __init__(self, keep: int = KEEP_LOADED) -> None:
        self.keep = keep
        self._loaded: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, reference: str) -> Model:
        """The model for a registry name, checkpoint, ONNX file or "a+b" ensemble; ValueError with
        one line for a model that is not there or cannot be loaded."""
        members = reference.split("+")
        for member in members:
            missing = missing_model(member)
            if missing:
                raise ValueError(missing)
        with self._lock:
            if reference not in self._loaded:
                self._loaded[reference] = load(reference)
                logger.info("loaded %s", reference)
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(reference)
            return self._loaded[reference]
