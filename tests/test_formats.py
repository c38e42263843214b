"""The output-format registry (helpers/inference/formats.py, writers.py): every kind in every
format it is registered for, read back; Parquet through the commands; the writers' guarantees
(complete after an interruption, symlinks written through, --resume carry-over, nothing left by
an abort); one line for a missing pyarrow; `--events x.JSONL` is JSON lines."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError, run_cli
from helpers.inference.formats import (FORMATS, KINDS, check_output_path, embeddings_schema, events_schema,
                                       open_output, output_format, probabilities_schema, suffixes, tags_schema)
from helpers.inference.embeddings import load_embeddings
from tests.conftest import REPO

pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow (pip install -r requirements-parquet.txt)")

CLASSES = ["Speech", "Dog", "Cat"]
TAGS = [("a.wav", 1, 2, "/m/c", "Cat", 0.75), ("a.wav", 2, 0, "/m/s", "Speech", 0.125)]
EVENTS = [("a.wav", 0.0, 2.0, "Dog", 0.5), ("b.wav", 1.0, 3.5, "Cat", 0.25)]
WINDOWS = [("a.wav", 0.0, 1.0, np.array([0.1, 0.2, 0.3], np.float32)),
           ("a.wav", 0.5, 1.5, np.array([0.4, 0.5, 0.6], np.float32))]
VECTORS = np.arange(8, dtype=np.float32).reshape(2, 4)


def _schemas() -> dict:
    return {"tags": (tags_schema({"model": "m", "sample_rate": 32000}), TAGS),
            "events": (events_schema({"model": "m", "threshold": 0.3}), EVENTS),
            "probabilities": (probabilities_schema(CLASSES, "m"), WINDOWS),
            "embeddings": (embeddings_schema(4, {"model": "m", "layer": -1, "sample_rate": 32000}),
                           [("a.wav", VECTORS[0]), ("b.wav", VECTORS[1])])}


def _read(path: Path, kind: str) -> list[tuple]:
    """The rows of an output read back with the format's own reader (pyarrow, csv, json, numpy)."""
    suffix = path.suffix
    if suffix == ".parquet":
        table = pq.read_table(path)
        assert json.loads(table.schema.metadata[b"efficientat"])["model"] == "m"
        if kind == "probabilities":
            return [(r["filename"], r["start"], r["end"], [r[c] for c in CLASSES]) for r in table.to_pylist()]
        return [tuple(r.values()) for r in table.to_pylist()]
    if suffix == ".csv":
        with open(path, newline="") as f:
            return [tuple(row) for row in list(csv.reader(f))[1:]]
    if suffix == ".json":
        data = json.loads(path.read_text())
        assert data["model"] == "m"
        if kind == "tags":
            return [(r["file"], *t.values()) for r in data["results"] for t in r["tags"]]
        return [tuple(e.values()) for e in data["events"]]
    if suffix == ".jsonl":
        return [tuple(json.loads(line).values()) for line in path.read_text().splitlines()]
    data = load_embeddings(path) if kind == "embeddings" else dict(np.load(path))
    if kind == "embeddings":
        assert data["model"] == "m" and data["layer"] == -1
        return list(zip(data["filenames"], data["embeddings"].tolist()))
    names = list(data["filenames"])
    return [(names[i], s, e, p.tolist()) for i, s, e, p in
            zip(data["file_index"], data["starts"], data["ends"], data["probabilities"])]


def _plain(row: tuple) -> tuple:
    return tuple(np.asarray(v).round(4).tolist() if isinstance(v, np.ndarray) else v for v in row)


@pytest.mark.parametrize("suffix, kind", [(s, k) for s, f in FORMATS.items() for k in KINDS if k in f.kinds])
def test_every_kind_in_every_format_reads_back(tmp_path: Path, suffix: str, kind: str) -> None:
    schema, rows = _schemas()[kind]
    path = tmp_path / f"out{suffix}"
    with open_output(path, schema) as writer:
        for row in rows:
            writer.add([row])
    read = _read(path, kind)
    if suffix == ".csv":  # text: compare as CSV writes it
        expected = [tuple(str(c) for c in row) for row in (_csv_cells(schema, r) for r in rows)]
        assert read == expected
    else:
        assert [_plain(tuple(np.float32(v).item() if isinstance(v, float) else v for v in r)) for r in read] == \
            [_plain(tuple(np.float32(v).item() if isinstance(v, float) else v for v in r)) for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def _csv_cells(schema, row: tuple) -> list:
    from helpers.inference.writers import CsvWriter
    return [cell for c, v in zip(schema.table.columns, row) for cell in CsvWriter._cells(c, v)]


def test_the_registry_is_one_table_of_suffixes():
    assert suffixes("tags") == (".csv", ".json", ".parquet")
    assert suffixes("events") == (".csv", ".json", ".jsonl", ".parquet")
    assert suffixes("probabilities") == (".csv", ".npz", ".parquet")
    assert suffixes("embeddings") == (".npz", ".parquet")
    assert output_format("X.PARQUET", "tags").suffix == ".parquet"
    assert output_format("-", "events").live and output_format("e.JSONL", "events").live
    with pytest.raises(InputError, match=r"e\.npz: --events must end in .csv, .json, .jsonl or .parquet"):
        output_format("e.npz", "events", "--events")


def test_a_missing_pyarrow_is_one_line_naming_the_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(InputError) as error:
        check_output_path("--output", tmp_path / "t.parquet", "tags")
    assert str(error.value) == (f"{tmp_path / 't.parquet'}: --output .parquet needs the pyarrow package: "
                                "pip install -r requirements-parquet.txt")
    import inference
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: inference.main(["--audio_path", str(REPO / "resources" / "demo_bells.wav"),
                                        "--output", str(tmp_path / "t.parquet")]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "requirements-parquet.txt" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_an_interruption_leaves_a_complete_file_and_resume_carries_it_over(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tags{suffix}"
    schema = tags_schema({"model": "m"})
    with pytest.raises(KeyboardInterrupt):
        with open_output(path, schema) as writer:
            writer.add(TAGS)
            raise KeyboardInterrupt
    assert _read(path, "tags")[0][0] == "a.wav"
    with open_output(path, schema, resume=True) as writer:
        assert writer.done == {"a.wav"} and writer.count == 1
        writer.add([("b.wav", 1, 1, "/m/d", "Dog", 0.5)])
    assert [r[0] for r in _read(path, "tags")] == ["a.wav", "a.wav", "b.wav"]
    with pytest.raises(RuntimeError):  # any other error: nothing written, the earlier file kept
        with open_output(path, schema) as writer:
            writer.add([("c.wav", 1, 1, "/m/d", "Dog", 0.5)])
            raise RuntimeError("boom")
    assert [r[0] for r in _read(path, "tags")] == ["a.wav", "a.wav", "b.wav"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet"])
def test_resume_refuses_a_file_of_another_layout(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    with open_output(path, events_schema({"model": "m"})) as writer:
        writer.add(EVENTS)
    before = path.read_bytes()
    with pytest.raises(InputError, match="cannot resume from it"):
        open_output(path, tags_schema({"model": "m"}), resume=True)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("suffix, kind", [(".parquet", "embeddings"), (".npz", "probabilities"),
                                          (".csv", "events")])
def test_a_symlinked_output_is_written_through(tmp_path: Path, suffix: str, kind: str) -> None:
    target = tmp_path / "real" / f"target{suffix}"
    target.parent.mkdir()
    link = tmp_path / f"link{suffix}"
    link.symlink_to(target)
    schema, rows = _schemas()[kind]
    with open_output(link, schema) as writer:
        writer.add(rows)
    assert link.is_symlink() and target.is_file() and len(_read(target, kind)) == len(rows)


def test_commands_write_parquet(tmp_path: Path, mn04_checkpoint: Path, labels_file: Path, capsys) -> None:
    import embeddings
    import inference
    import windowed_inference
    demo = str(REPO / "resources" / "demo_bells.wav")
    assert run_cli(lambda: inference.main(["--model_name", "mn04_as", "--audio_path", demo, "--top_k", "3", "--output",
                                           str(tmp_path / "tags.parquet")])) == 0
    tags = pq.read_table(tmp_path / "tags.parquet")
    assert tags.column_names == ["file", "rank", "index", "mid", "label", "probability"]
    assert tags.column("label").to_pylist() == ["Clang", "Ding", "Singing bowl"]
    meta = json.loads(tags.schema.metadata[b"efficientat"])
    assert meta["model_record"]["name"] == "mn04_as" and meta["model_record"]["classes"] == 527
    assert {k: v for k, v in meta.items() if k != "model_record"} == {"kind": "tags", "model": "mn04_as",
                                                                       "sample_rate": 32000}
    assert run_cli(lambda: embeddings.main(["--model_name", "mn04_as", "--audio_path", demo, "--output", str(tmp_path / "e.parquet")])) == 0
    assert load_embeddings(tmp_path / "e.parquet")["embeddings"].shape == (1, 384)
    assert run_cli(lambda: windowed_inference.main([
        "--model_name", "mn04_as", "--audio_path", demo, "--window_length", "2", "--hop_length", "1", "--top_k", "0", "--threshold", "0.3",
        "--events", str(tmp_path / "ev.parquet"), "--probabilities", str(tmp_path / "p.parquet")])) == 0
    events = pq.read_table(tmp_path / "ev.parquet").to_pylist()
    assert events and set(events[0]) == {"filename", "onset", "offset", "event_label", "probability"}
    probs = pq.read_table(tmp_path / "p.parquet")
    assert probs.num_rows == 5 and probs.column_names[:3] == ["filename", "start", "end"]
    assert len(probs.column_names) == 3 + 527 and probs.column("Clang").type == "float"
    capsys.readouterr()


def test_events_to_an_upper_case_jsonl_file_are_json_lines(tmp_path: Path, mn04_checkpoint: Path,
                                                           labels_file: Path, capsys) -> None:
    """The suffix check and the writer take the one registry, in any case (was: CSV)."""
    import windowed_inference
    out = tmp_path / "events.JSONL"
    assert run_cli(lambda: windowed_inference.main([
        "--model_name", "mn04_as", "--audio_path", str(REPO / "resources" / "demo_bells.wav"), "--window_length", "2", "--hop_length", "1",
        "--top_k", "0", "--events", str(out), "--wall_clock"])) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and {line["event"] for line in lines} == {"start", "end"} and all("time" in line for line in lines)
    capsys.readouterr()
