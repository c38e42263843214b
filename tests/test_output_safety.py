"""Issue 31 items 9 and 10, in the one output entry point (helpers/inference/formats.py): an
output that is also an input (the same file under any spelling) is refused by every command
before any work, and every output records the model that wrote it (a JSON field, a CSV's
sidecar, Parquet metadata, an .npz array), so that a --resume by another model is refused."""
from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import embeddings
import export_onnx
import inference
import windowed_inference
from common.errors import InputError, run_cli
from helpers.inference.formats import (MODEL_FIELDS, check_output_path, embeddings_schema, events_schema,
                                       open_output, probabilities_schema, tags_schema)
from helpers.inference.writers import MODEL_RECORD, CsvWriter
from tests.conftest import REPO

DEMO = REPO / "resources" / "demo_bells.wav"
RECORD = {"name": "m", "checksum": "sha256:aa", "classes": 3, "classes_sha256": "bb",
          "frontend": {"sr": 32000, "n_mels": 128, "fmin": 0.0, "fmax": 15000.0}}
TAGS = [("a.wav", 1, 2, "/m/c", "Cat", 0.75)]


def _spellings(tmp_path: Path, audio: Path) -> dict[str, str]:
    """The same file as other paths (from `tmp_path`): relative with a detour, a symbolic link,
    a hard link."""
    (tmp_path / "sub").mkdir(exist_ok=True)
    link, hard = tmp_path / f"link{audio.suffix}", tmp_path / f"hard{audio.suffix}"
    link.symlink_to(audio)
    os.link(audio, hard)
    return {"itself": str(audio), "detour": f"sub/../{audio.name}", "symlink": str(link), "hardlink": str(hard)}


COMMANDS: dict[str, Callable[[str, str], tuple[Callable, list[str]]]] = {
    "inference --output": lambda a, o: (inference.main, ["--audio_path", a, "--output", o]),
    "windowed_inference --events": lambda a, o: (windowed_inference.main, ["--audio_path", a, "--events", o]),
    "windowed_inference --probabilities": lambda a, o: (windowed_inference.main,
                                                        ["--audio_path", a, "--probabilities", o]),
    "windowed_inference --plot": lambda a, o: (windowed_inference.main, ["--audio_path", a, "--plot", o]),
    "embeddings --output": lambda a, o: (embeddings.main, ["--audio_path", a, "--output", o]),
    "export_onnx --output": lambda a, o: (export_onnx.main, ["--quantize", "int8", "--calibration", a,
                                                             "--output", o]),
}
SUFFIX = {"inference --output": ".csv", "windowed_inference --events": ".json",
          "windowed_inference --probabilities": ".npz", "windowed_inference --plot": ".png",
          "embeddings --output": ".npz", "export_onnx --output": ".onnx"}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("spelling", ["itself", "detour", "symlink", "hardlink"])
def test_every_command_refuses_an_output_that_is_an_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture, command: str,
                                                          spelling: str) -> None:
    """An audio file that happens to carry an output's suffix, named as input and (spelled any
    way) as output: one line naming both, status 2, the recording untouched."""
    audio = tmp_path / f"recording{SUFFIX[command]}"
    shutil.copy(DEMO, audio)
    before = audio.read_bytes()
    monkeypatch.chdir(tmp_path)
    names = _spellings(tmp_path, audio)
    out = names[spelling]
    main, argv = COMMANDS[command](str(audio), out)
    assert _status(lambda: run_cli(lambda: main(argv))) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {out}: ") and "is also an input" in error and str(audio) in error
    assert audio.read_bytes() == before


def test_open_output_refuses_a_found_input_and_a_model_file(tmp_path: Path) -> None:
    """The check at opening covers the files found in folders and the model's file too."""
    clip = tmp_path / "found.json"
    clip.write_bytes(b"RIFF")
    with pytest.raises(InputError, match="is also an input"):
        open_output(tmp_path / "." / "found.json", tags_schema({}), inputs=[tmp_path / "other.wav", clip])
    assert clip.read_bytes() == b"RIFF"
    assert check_output_path("--output", tmp_path / "new.json", "tags", inputs=[clip]) is not None


def _status(run: Callable[[], object]) -> object:
    """A command's exit status, whether returned or raised (a flag error exits at parsing)."""
    try:
        return run()
    except SystemExit as e:
        return e.code


def _record(path: Path) -> dict:
    """The model record an output holds, read with the format's own reader."""
    if path.suffix == ".json":
        return json.loads(path.read_text())[MODEL_RECORD]
    if path.suffix == ".csv":
        return json.loads(CsvWriter.sidecar(path).read_text())
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data[MODEL_RECORD]))
    import pyarrow.parquet as pq
    return json.loads(pq.read_schema(path).metadata[b"efficientat"])[MODEL_RECORD]


@pytest.mark.parametrize("suffix, schema, rows", [
    (".json", tags_schema({"model": "m"}), TAGS), (".csv", tags_schema({"model": "m"}), TAGS),
    (".parquet", events_schema({"model": "m"}), [("a.wav", 0.0, 1.0, "Dog", 0.5)]),
    (".npz", probabilities_schema(["a", "b", "c"], "m"), [("a.wav", 0.0, 1.0, np.ones(3, np.float32))]),
    (".npz", embeddings_schema(2, {"model": "m", "layer": -1, "sample_rate": 32000}),
     [("a.wav", np.ones(2, np.float32))])])
def test_every_format_records_the_model(tmp_path: Path, suffix: str, schema, rows) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"out{suffix}"
    with open_output(path, schema, model=RECORD) as writer:
        writer.add(rows)
    assert _record(path) == RECORD


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
@pytest.mark.parametrize("field", MODEL_FIELDS)
def test_resume_by_another_model_is_refused(tmp_path: Path, suffix: str, field: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"tags{suffix}"
    with open_output(path, tags_schema({"model": "m"}), model=RECORD) as writer:
        writer.add(TAGS)
    before = path.read_bytes()
    other = {**RECORD, "name": "other", field: "something else"}
    with pytest.raises(InputError, match=f"written by m, not by other \\(their {field} differ\\)"):
        open_output(path, tags_schema({"model": "other"}), resume=True, model=other)
    assert path.read_bytes() == before
    same = {**RECORD, "name": "m spelled otherwise"}
    with open_output(path, tags_schema({"model": "m"}), resume=True, model=same) as writer:
        assert writer.done == {"a.wav"}


def test_resume_of_an_output_without_a_record_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "tags.json"
    with open_output(path, tags_schema({"model": "m"})) as writer:
        writer.add(TAGS)
    with open_output(path, tags_schema({"model": "m"}), resume=True, model=RECORD) as writer:
        assert writer.done == {"a.wav"}
    assert capsys.readouterr().err.startswith(f"warning: {path}: --output records no model")


def test_inference_resume_with_other_frontend_settings_is_refused(tmp_path: Path, mn04_checkpoint: Path,
                                                                  labels_file: Path, capsys) -> None:
    """The same weights on other mel bands tag differently: not the model that wrote the file."""
    out = tmp_path / "tags.csv"
    argv = ["--model_name", "mn04_as", "--audio_path", str(DEMO), "--output", str(out)]
    assert run_cli(lambda: inference.main(argv)) == 0
    record = _record(out)
    assert record["name"] == "mn04_as" and record["classes"] == 527 and record["checksum"]
    assert record["frontend"]["sr"] == 32000
    before = out.read_bytes()
    assert _status(lambda: run_cli(lambda: inference.main(argv + ["--resume", "--fmin", "200"]))) == 2
    assert "not by mn04_as (their frontend differ)" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run_cli(lambda: inference.main(argv + ["--resume"])) == 0
    assert "resuming: 1 file(s) already in" in capsys.readouterr().err


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if parts[0] in ("tests", ".git") or "__pycache__" in parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == name:
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


def test_every_output_is_opened_with_its_model_and_inputs() -> None:
    """Every open_output call gives the model record and the inputs; every check_output_path the
    inputs (so no command can skip items 9 and 10)."""
    opened = _calls("open_output")
    assert opened
    missing = [where for where, call in opened if not {"model", "inputs"} <= {k.arg for k in call.keywords}]
    checked = [where for where, call in _calls("check_output_path")
               if len(call.args) < 4 and "inputs" not in {k.arg for k in call.keywords}]
    assert not missing and not checked
