"""The web page's computations (helpers/demo), without a browser: they give what the commands give.

The page's events, event files and timeline equal windowed_inference.py's for the same file and
settings, its tags and embedding equal the Python API's (inference.py's and embeddings.py's
numbers); a long recording is streamed with progress; bad input is one line naming the file; the
picker offers what is there and says how to get the rest; the Live tab's session finds the events
the command finds in the same audio. demo.py serves on 127.0.0.1 only and
refuses bad flags in one line. The browser tests are in tests/test_demo_browser.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import matplotlib.image
import numpy as np
import pytest
import soundfile as sf
import torch

import windowed_inference
from common.errors import InputError
from helpers.demo import analysis as page_analysis
from helpers.demo.analysis import PageError, Settings, analyse
from helpers.demo.live import LiveSession
from helpers.demo.models import Taggers, missing_model, model_choices
from helpers.inference.api import Tagger
from tests.browser import free_port
from tests.conftest import REPO
from tests.datagen import bells_clip

SETTINGS = Settings(window=2.0, hop=1.0, threshold=0.3, top_k=10)


@pytest.fixture(scope="module")
def taggers(mn04_checkpoint: Path, labels_file: Path) -> Taggers:
    return Taggers()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Faint noise, the bells, faint noise: 12 s at 44.1 kHz (resampled on the way in)."""
    return bells_clip(tmp_path_factory.mktemp("clip") / "bells.wav", sr=44100)


def _command(tmp: Path, clip: Path, *flags: str) -> Path:
    """windowed_inference.py on `clip` (run from its folder, so the files name it as the page does)."""
    out = tmp / "command"
    out.mkdir(exist_ok=True)
    code = windowed_inference.main(["--model_name", "mn04_as", "--audio_path", clip.name, "--window_length", "2",
                                    "--hop_length", "1", "--top_k", "0", "--events", str(out / "events.csv"),
                                    "--plot", str(out / "plot.png"), *flags])
    assert code == 0
    return out


def test_the_page_shows_what_the_commands_give(taggers: Taggers, clip: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(clip.parent)
    result = analyse(taggers.get("mn04_as"), clip, clip.name, SETTINGS, tmp_path / "page")
    command = _command(tmp_path, clip)
    # the events and their files, byte for byte
    csv = next(p for p in result.downloads if p.name.endswith("_events.csv"))
    assert csv.read_text() == (command / "events.csv").read_text()
    assert any(e.event_label in ("Ding", "Clang") and e.onset >= 2.0 for e in result.events)
    written = json.loads(next(p for p in result.downloads if p.suffix == ".json").read_text())
    assert written["model"] == "mn04_as" and len(written["events"]) == len(result.events)
    # the timeline is the command's --plot figure
    assert np.array_equal(matplotlib.image.imread(result.timeline), matplotlib.image.imread(command / "plot.png"))
    # the clip's tags and embedding: the Python API's (inference.py's and embeddings.py's numbers)
    api = Tagger("mn04_as")
    assert result.tags == api.tag(str(clip), top_k=10)
    embedding = np.load(next(p for p in result.downloads if p.suffix == ".npy"))
    assert embedding.shape == (384,) and np.allclose(embedding, api.embed(str(clip))[0], atol=1e-6)
    assert result.duration == pytest.approx(12.0) and result.name == "bells.wav"


def test_the_demo_clip_gets_the_readme_tags(taggers: Taggers, tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parents[1] / "resources" / "demo_bells.wav"
    result = analyse(taggers.get("mn04_as"), demo, demo.name, SETTINGS, tmp_path)
    assert [(label, round(p, 3)) for label, p in result.tags[:2]] == [("Clang", 0.589), ("Ding", 0.537)]
    assert [(e.event_label, e.onset, e.offset) for e in result.events] == [("Ding", 0.0, 6.0)]


def test_a_long_recording_is_streamed_with_progress(taggers: Taggers, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A recording past a minute: decoded block by block in both passes (never loaded whole), the
    clip pass in chunks; the progress climbs to 1 through both passes."""
    path = bells_clip(tmp_path / "long.flac", before=60.0, after=20.0, repeats=2)

    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("the recording was loaded whole")

    monkeypatch.setattr("datasets.audio.load_audio", whole)
    seen: list[tuple[float, str]] = []
    settings = Settings(window=10.0, hop=2.5, top_k=5, mode="shared")
    result = analyse(taggers.get("mn04_as"), path, path.name, settings, tmp_path / "out",
                     lambda done, what: seen.append((done, what)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any(w.startswith("windows: ") for _, w in seen) and seen[-1][1] == "clip tags: 1:32 of 1:32"
    assert result.tags == Tagger("mn04_as").tag(str(path), top_k=5)  # chunked as inference.py chunks it
    assert result.duration == pytest.approx(92.0) and result.note == ""


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its one line says)."""
    (folder / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio at all" * 50)
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "silent0s.wav", np.zeros(0, np.float32), 16000)
    (folder / "notes.mp3").write_text("a text file named like audio\n" * 20)
    return {"unreadable": (folder / "noise.wav", "noise.wav: not a readable audio file"),
            "empty": (folder / "empty.wav", "empty.wav: file is empty"),
            "zero seconds": (folder / "silent0s.wav", "silent0s.wav: contains no audio samples"),
            "not audio": (folder / "notes.mp3", "notes.mp3: not a readable audio file")}


@pytest.mark.parametrize("case", ["unreadable", "empty", "zero seconds", "not audio"])
def test_bad_input_is_one_line_naming_the_file(case: str, taggers: Taggers, tmp_path: Path) -> None:
    path, expected = _bad_files(tmp_path)[case]
    with pytest.raises(PageError) as info:  # the file as the browser named it, not the server's copy
        analyse(taggers.get("mn04_as"), path, path.name, SETTINGS, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(expected) and "\n" not in message and str(path.parent) not in message


@pytest.mark.parametrize("settings, expected", [
    (Settings(window=0.01), "window must be at least 0.032 s"),
    (Settings(window=120.0), "window must be at most 60 s"),
    (Settings(hop=0.0), "hop must be positive"),
    (Settings(threshold=1.5), "threshold must be between 0 and 1"),
    (Settings(top_k=0), "top-k must be between 1 and 527"),
])
def test_settings_out_of_range_are_one_line(settings: Settings, expected: str, taggers: Taggers) -> None:
    with pytest.raises(PageError, match=expected):
        settings.samples(taggers.get("mn04_as"))


def test_the_picker_offers_what_is_there_and_says_how_to_get_the_rest(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    (tmp_path / "mn10_as_mAP_471.pt").write_bytes(b"a checkpoint in the cache")
    choices = model_choices(["runs/Custom/best.pt"])
    values = [value for _, value in choices]
    assert choices[0] == ("mn04_as (shipped, mAP 43.2)", "mn04_as")
    assert ("mn10_as (cached, mAP 47.1)", "mn10_as") in choices
    assert ("best.pt (given to demo.py)", "runs/Custom/best.pt") in choices
    assert ("dymn10_as (not downloaded)", "dymn10_as") in choices and values.count("mn10_as") == 1
    line = missing_model("dymn10_as")
    assert line.startswith("dymn10_as is not downloaded: run `python inference.py --model_name dymn10_as")
    assert "releases/download/v0.0.1/dymn10_as.pt" in line and str(tmp_path) in line
    assert missing_model("mn04_as") is None and missing_model("mn10_as") is None
    with pytest.raises(ValueError, match="dymn10_as is not downloaded"):  # and nothing is downloaded
        Taggers().get("mn04_as+dymn10_as")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mn10_as_mAP_471.pt"]


def test_the_live_session_finds_the_commands_events(taggers: Taggers, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The browser's pieces (48 kHz, 0.1 s each) through the live loop: the events of
    windowed_inference.py on the same audio as a file, each as it ends; tags and a timeline meanwhile
    (fed at once, faster than a microphone: nothing may be dropped for falling behind)."""
    path = bells_clip(tmp_path / "mic.wav", sr=48000)
    samples, rate = sf.read(path, dtype="float32")
    live = LiveSession(taggers.get("mn04_as"), SETTINGS, rate, max_behind=60.0)
    for start in range(0, len(samples), rate // 10):
        live.feed(samples[start:start + rate // 10])
    deadline = time.monotonic() + 60
    while live.snapshot(5).windows < 9 and time.monotonic() < deadline:  # a window is done every second
        time.sleep(0.05)
    shot = live.snapshot(5)
    assert shot.seconds == pytest.approx(12.0) and shot.windows >= 9 and len(shot.tags) == 5
    live.finish()
    last = live.snapshot(5)
    assert live.finished and live.error is None and last.windows == 11
    assert last.timeline is not None and last.timeline.startswith(b"\x89PNG")
    monkeypatch.chdir(tmp_path)
    command = (_command(tmp_path, path) / "events.csv").read_text().splitlines()[1:]
    page = [f"mic.wav,{e.onset},{e.offset},{e.event_label},{e.probability}" for e in live.ended_events()]
    assert page == command and page
    assert [row[:2] for row in last.events] == [[e.event_label, e.onset] for e in live.ended_events()]
    files = live.downloads(tmp_path / "live")
    assert [p.suffix for p in files] == [".csv", ".json"]


def test_a_live_session_without_audio_says_so(taggers: Taggers) -> None:
    live = LiveSession(taggers.get("mn04_as"), SETTINGS, 48000)
    live.finish()
    assert live.finished and live.error == "browser microphone: the stream holds no audio samples"
    assert live.snapshot(5).windows == 0 and live.ended_events() == []


def test_write_results_names_files_after_the_recording_and_model(taggers: Taggers, tmp_path: Path) -> None:
    files = page_analysis.write_results(tmp_path, "a_b", taggers.get("mn04_as"), SETTINGS, [])
    assert [p.name for p in files] == ["a_b_events.csv", "a_b_events.json"]
    assert files[0].read_text() == "filename,onset,offset,event_label,probability\n"
    assert page_analysis.slug("night 1/ähm?.wav") == "night_1_hm_.wav" and page_analysis.slug("///") == "audio"


def _listening(port: int) -> list[str]:
    """The local addresses of TCP sockets listening on `port` (/proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                found.append(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6,
                                              b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def test_demo_py_serves_the_page_until_stopped(tmp_path: Path, mn04_checkpoint: Path) -> None:
    """The script: on 127.0.0.1 only, the page's config served; SIGTERM stops it (status 0), its files removed."""
    pytest.importorskip("gradio")
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    server = subprocess.Popen([sys.executable, "demo.py", "--port", str(port)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = server.stdout.readline()  # the line it prints once it serves (empty: it ended)
        assert ready.startswith(f"EfficientAT page on http://127.0.0.1:{port}"), server.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            config = json.loads(response.read())
        assert config["title"] == "EfficientAT: what sounds, and when" and _listening(port) == ["127.0.0.1"]
        assert [p.name for p in tmp_path.glob("efficientat-page-*")]  # where the sessions' files go
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert not list(tmp_path.glob("efficientat-page-*"))


@pytest.fixture
def keep_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("argv, line", [
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["--threads", "0"], "--max_upload_mb must be positive and --threads at least 1"),
    (["--models", "runs/missing/best.pt"], "runs/missing/best.pt"),
    (["--models", "dymn20_as"], "dymn20_as is not downloaded: run `python inference.py"),
    (["--window_length", "0.01"], "window must be at least 0.032 s"),
    (["--window_size", "0.01"], "window must be at least 0.032 s"),  # the old spelling maps
])
def test_demo_py_refuses_bad_flags_in_one_line(argv: list[str], line: str, keep_threads: None,
                                              mn04_checkpoint: Path) -> None:
    import demo
    with pytest.raises(InputError) as info:
        demo.main(argv)
    assert line in str(info.value) and "\n" not in str(info.value)


def test_demo_py_says_when_its_port_is_taken(keep_threads: None, mn04_checkpoint: Path) -> None:
    pytest.importorskip("gradio")
    import demo
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
            demo.main(["--port", str(port)])


def test_the_page_sits_above_the_inference_code() -> None:
    """helpers/demo may use the other helpers; none of them, and no command, uses the page."""
    from tests.test_layering import _imports, _module, _project_files
    users = [_module(p) for p in _project_files() if _module(p).split(".")[0] not in ("tests", "benchmarks")
             and not _module(p).startswith("helpers.demo") and _module(p) != "demo"
             and any(name.startswith("helpers.demo") for name in _imports(p))]
    assert users == []
