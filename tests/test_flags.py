"""One meaning per flag across the scripts (common/flags.py): `*_size` flags count samples,
`*_length` flags are seconds, `--resample_rate` / `--sample_rate` is the model's rate and
`--input_rate` a raw stream's, `--cache_path` the waveform cache and `--embedding_cache` the
probe's. Each old spelling warns in one line and maps to its new flag; one name per concept in the
code (one `Tagger`, one `build_model`, one `CHUNK_SECONDS`); inference.py takes the frontend flags
training takes; `WindowEngine.lookahead` is what a shared window waits for."""
from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import complexity
import embeddings
import export_onnx
import inference
import windowed_inference
from common.flags import OldSpelling
from helpers.training.args import finetune_parser
from tests.conftest import REPO

DEMO = str(REPO / "resources" / "demo_bells.wav")


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(parse: Callable, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a script's parse function builds (stopped at its parse_args)."""
    def capture(self: argparse.ArgumentParser, *args, **kwargs):
        raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        parse([])
    monkeypatch.undo()
    return caught.value.parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


SCRIPTS = {"inference.py": inference.parse_args, "windowed_inference.py": windowed_inference.parse_args,
           "embeddings.py": embeddings.parse_args, "export_onnx.py": export_onnx.parse_args,
           "complexity.py": complexity.parse_args,
           "ex_esc50.py (fine-tuning)": lambda argv: finetune_parser("x", "X", 8, 1e-4, "X_DIR").parse_args(argv)}


def test_every_flag_has_one_meaning_across_the_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag any script takes has the same type and destination in every script that takes it
    (an old spelling aside, which names its new flag); the vocabulary's flags count what they say."""
    seen: dict[str, tuple[str, object, str]] = {}
    for script, parse in SCRIPTS.items():
        for option, action in _flags(parser_of(parse, monkeypatch)).items():
            if isinstance(action, OldSpelling) or option in ("-h", "--help"):
                continue
            meaning = (action.dest, action.type or str, script)
            if option in seen:
                assert seen[option][:2] == meaning[:2], f"{option}: {seen[option]} vs {meaning}"
            seen[option] = meaning
    assert seen["--window_size"][1] is int and seen["--hop_size"][1] is int  # STFT samples
    assert seen["--window_length"][1] is float and seen["--hop_length"][1] is float  # seconds
    assert seen["--sample_rate"][0] == seen["--resample_rate"][0] == "resample_rate"  # the model's rate
    assert seen["--input_rate"][0] == "input_rate" and "--cache_dir" not in seen


@pytest.mark.parametrize("argv, dest, value, new", [
    (["--audio_path", DEMO, "--window_size", "2"], "window_length", 2.0, "--window_length"),
    (["--audio_path", "-", "--raw", "s16le", "--sample_rate", "16000"], "input_rate", 16000, "--input_rate"),
])
def test_windowed_inference_old_spellings_warn_and_map(argv: list[str], dest: str, value: object, new: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    args = windowed_inference.parse_args(argv)
    lines = capsys.readouterr().err.splitlines()
    assert getattr(args, dest) == value
    assert len(lines) == 1 and lines[0].startswith(f"warning: {argv[-2]} is the old spelling of {new} (")
    assert lines[0].endswith(f": use {new}")
    new_argv = [new if a == argv[-2] else a for a in argv]
    assert vars(windowed_inference.parse_args(new_argv)) == vars(args) and not capsys.readouterr().err


def test_fine_tuning_cache_dir_is_the_embedding_cache(capsys: pytest.CaptureFixture) -> None:
    parser = finetune_parser("x", "X", 8, 1e-4, "X_DIR")
    args = parser.parse_args(["--cache_dir", "/tmp/emb", "--cache_path", "/tmp/wav"])
    lines = capsys.readouterr().err.splitlines()
    assert args.embedding_cache == "/tmp/emb" and args.cache_path == "/tmp/wav"
    assert len(lines) == 1 and lines[0].startswith("warning: --cache_dir is the old spelling of --embedding_cache")


def test_inference_sample_rate_is_the_original_spelling_of_resample_rate(capsys: pytest.CaptureFixture) -> None:
    """The original inference.py's --sample_rate (the model's rate) works without a warning."""
    old = inference.parse_args(["--audio_path", DEMO, "--sample_rate", "32000", "--window_size", "800"])
    new = inference.parse_args(["--audio_path", DEMO, "--resample_rate", "32000", "--window_size", "800"])
    assert vars(old) == vars(new) and old.resample_rate == 32000 and not capsys.readouterr().err


def test_inference_passes_the_band_settings_training_takes(tmp_path: Path, mn04_checkpoint: Path,
                                                           labels_file: Path, capsys) -> None:
    """--fmin / --fmax change the frontend as they do in training (they were accepted nowhere)."""
    import json
    from common.errors import run_cli
    from helpers.inference.resolve import resolve_model
    from models.config import FrontendConfig
    out = tmp_path / "tags.json"
    argv = ["--model_name", "mn04_as", "--audio_path", DEMO, "--all_classes", "--output", str(out)]
    assert run_cli(lambda: inference.main(argv + ["--fmin", "200", "--fmax", "8000"])) == 0
    tags = {t["label"]: t["probability"] for t in json.loads(out.read_text())["results"][0]["tags"]}
    loaded = resolve_model("mn04_as", frontend=FrontendConfig(fmin=200.0, fmax=8000.0))
    assert loaded.frontend.fmin == 200.0 and loaded.frontend.fmax == 8000.0
    expected = loaded.predict(loaded_audio(loaded.sample_rate))[0]
    plain = resolve_model("mn04_as").predict(loaded_audio(32000))[0]
    index = loaded.class_names.index("Clang")
    assert tags["Clang"] == pytest.approx(float(expected[index]), abs=1e-5)
    assert abs(float(plain[index]) - float(expected[index])) > 1e-3  # the bands changed the tags
    capsys.readouterr()


def loaded_audio(rate: int) -> np.ndarray:
    from datasets.audio import load_audio
    return load_audio(DEMO, rate)[None]


def _definitions(name: str) -> list[str]:
    """Where the project's code (not tests) defines `name` at a module's top level."""
    found = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if parts[0] in ("tests", ".git") or "__pycache__" in parts:
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            names = [node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else \
                [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
            found += [str(path.relative_to(REPO)) for n in names if n == name]
    return found


@pytest.mark.parametrize("name, where", [("Tagger", "helpers/inference/api.py"),
                                         ("build_model", "models/factory.py"),
                                         ("CHUNK_SECONDS", "helpers/inference/batching.py"),
                                         ("DEFAULT_MODEL", "models/pretrained.py")])
def test_one_definition_per_name(name: str, where: str) -> None:
    assert _definitions(name) == [where]


def test_shared_windows_come_out_within_the_lookahead() -> None:
    """`lookahead` is the most audio past a window's end before `push` returns it (shared), and 0
    for exact windows: measured by feeding a stream in small blocks (a window comes out in the
    block that brings the audio to its end + lookahead, so up to a block later)."""
    from helpers.inference.windows import WindowEngine
    from tests.test_windows import SR, StatsTagger, _signal, _small_mn_tagger
    assert WindowEngine(StatsTagger(), 30, 10, "exact").lookahead == 0
    window, hop, block = 2 * SR, SR // 2, 1000
    engine = WindowEngine(_small_mn_tagger(), window, hop, "shared")
    engine.chunk = 5 * engine._shared.frame  # 1.6 s of new audio a pass: the test stays short
    assert engine.lookahead == engine._shared.margin + engine.chunk > 0
    signal, lags = _signal(engine.lookahead / SR + 8), []
    for start in range(0, len(signal), block):
        for index, _ in engine.push(signal[start:start + block]):
            lags.append(engine.num_samples - (index * hop + window))
    assert len(lags) >= 10 and min(lags) >= 0 and max(lags) < engine.lookahead + block
    assert max(lags) > engine.lookahead - hop  # the bound is reached, not loose


def test_one_default_model_everywhere_and_it_ships(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command, training script, the Python API, torch.hub and the HEAR module default to
    models.pretrained.DEFAULT_MODEL, whose checkpoint ships in resources/ (no network)."""
    import inspect
    import ex_audioset
    import hubconf
    from helpers.inference import hear
    from helpers.inference.api import Tagger
    from models.config import ModelConfig
    from models.pretrained import DEFAULT_MODEL, REGISTRY
    assert DEFAULT_MODEL == "mn04_as" and (REPO / "resources" / REGISTRY[DEFAULT_MODEL].filename).is_file()
    parsers = {**SCRIPTS, "ex_audioset.py": ex_audioset.parse_args}
    for script, parse in parsers.items():
        action = _flags(parser_of(parse, monkeypatch))["--model_name"]
        assert action.default in (DEFAULT_MODEL, None), script
        assert DEFAULT_MODEL in (action.help or ""), script  # the help says which one
    assert inference.model_ref(inference.parse_args(["--audio_path", DEMO])).names == (DEFAULT_MODEL,)
    for function in (Tagger, hubconf.tagger, hear.load_model):
        defaults = [p.default for p in inspect.signature(function).parameters.values()]
        assert DEFAULT_MODEL in defaults, function
    assert ModelConfig().name == DEFAULT_MODEL


def test_no_script_names_a_registry_model_as_a_flag_default() -> None:
    """A model name as a literal flag default would bypass DEFAULT_MODEL (and could need the network)."""
    from models.pretrained import REGISTRY
    found = []
    for path in sorted(REPO.glob("*.py")) + sorted((REPO / "helpers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                found += [f"{path.name}:{node.lineno}" for k in node.keywords if k.arg == "default"
                          and isinstance(k.value, ast.Constant) and k.value.value in REGISTRY]
    assert not found
