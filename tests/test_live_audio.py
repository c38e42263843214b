"""Live audio in windowed_inference.py: streams on stdin (WAV without a length, raw PCM, mp3), events
as JSON lines while the audio arrives, the end of a stream (EOF, signals, a closed pipe, a stall),
bad streams, the microphone without sounddevice, and the incremental event detector."""
from __future__ import annotations

import csv
import json
import re
import resource
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.errors import InputError
from datasets.hdf5 import encode_mp3
from datasets.stream import pcm_to_float
from helpers.inference.events import EventTracker
from helpers.inference.sed import WindowPredictions, detect_events, num_windows
from tests.conftest import REPO

SCRIPT = str(REPO / "windowed_inference.py")
RATE = 44100
SETTINGS = ["--model", "mn04_as", "--window_length", "4", "--hop_length", "1", "--threshold", "0.2"]


def test_events_while_streaming_equal_detect_events() -> None:
    """Window by window, the tracker gives exactly detect_events' events, for any window, hop and length."""
    rng = np.random.default_rng(1)
    names = [f"class {i}" for i in range(5)]
    for _ in range(300):
        window = int(rng.integers(2, 12))
        hop, n = int(rng.integers(1, window + 1)), int(rng.integers(1, 60))
        probs = rng.random((num_windows(n, window, hop), 5)).astype(np.float32)
        expected = detect_events(WindowPredictions("f", 1000, window, hop, n, probs), names, 0.5)
        tracker = EventTracker(names, window, hop, 1000, 0.5, "f")
        done = [i for i in range(len(probs)) if i * hop + window <= n]  # complete before the end
        changes = [c for i in done for c in tracker.push(i, probs[i])]
        changes += tracker.finish(n, [(i, probs[i]) for i in range(len(done), len(probs))])
        assert tracker.sorted_events() == expected
        assert [c.kind for c in changes].count("start") == len(expected)


def test_pcm_formats_decode_as_libsndfile_does(tmp_path: Path) -> None:
    samples = (np.random.default_rng(0).standard_normal((100, 2)) * 0.3).clip(-1, 1)
    for subtype, dtype, scale in (("PCM_16", "<i2", 1 << 15), ("PCM_24", "s24", 1 << 23), ("PCM_U8", "u1", 1 << 7)):
        sf.write(tmp_path / "x.wav", samples, 8000, subtype=subtype)
        data = (tmp_path / "x.wav").read_bytes()
        data = data[data.index(b"data") + 8:]
        np.testing.assert_array_equal(pcm_to_float(data, dtype, scale, 2),
                                      sf.read(tmp_path / "x.wav", dtype="float32")[0].T)


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """20 s of 44.1-kHz stereo: 6 s silence, 6 s tone, 8 s noise; as a file, a streaming WAV (sizes
    0xFFFFFFFF), raw PCM and an mp3 without a length header; and the events of the files."""
    folder = tmp_path_factory.mktemp("live")
    t = np.arange(6 * RATE) / RATE
    mono = np.concatenate([np.zeros(6 * RATE), 0.3 * np.sin(2 * np.pi * 880 * t) + 0.1 * np.sin(2 * np.pi * 1760 * t),
                           0.2 * np.random.default_rng(0).standard_normal(8 * RATE)])
    stereo = np.stack([mono, 0.5 * mono], 1).astype(np.float32)
    sf.write(folder / "a.wav", stereo, RATE, subtype="PCM_16")
    data = bytearray((folder / "a.wav").read_bytes())
    at = data.index(b"data")
    stream = data[:4] + b"\xff\xff\xff\xff" + data[8:at + 4] + b"\xff\xff\xff\xff" + data[at + 8:]
    pcm = bytes(data[at + 8:])
    mp3 = encode_mp3(stereo.T, RATE, xing_header=False)
    (folder / "a.mp3").write_bytes(mp3)
    return {"folder": folder, "wav_stream": bytes(stream), "s16le": pcm, "mp3": mp3}


def run(args: list[str], stdin: bytes = b"", **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, cwd=REPO,
                          timeout=300, **kwargs)


def csv_events(path: Path) -> list[tuple]:
    with open(path, newline="") as f:
        return [(r["filename"], float(r["onset"]), float(r["offset"]), r["event_label"], float(r["probability"]))
                for r in csv.DictReader(f)]


def json_events(stdout: bytes) -> list[tuple]:
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    ends = [e for e in lines if e["event"] == "end"]
    assert len(ends) == len([e for e in lines if e["event"] == "start"])
    return sorted((e["onset"], e["offset"], e["label"], e["max_probability"]) for e in ends)


def stream_with_a_stall(args: list[str], data: bytes) -> subprocess.CompletedProcess:
    """Run with `data` on stdin: the first half, a pause of 2 s once the first line is out, the rest."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, bufsize=0)
    half = len(data) // 2 // 4 * 4
    proc.stdin.write(data[:half])
    proc.stdin.flush()
    first = _read_line(proc)  # while the writer holds the pipe open
    time.sleep(2)
    out, err = proc.communicate(data[half:], timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, first + out, err)


def test_streams_give_the_events_of_the_files(audio: dict, mn04_checkpoint: Path, labels_file: Path) -> None:
    """A WAV stream of unknown length, raw s16le (stalling half-way) and an mp3 stream, each 44.1-kHz
    stereo, give the events of the same audio as a file."""
    folder = audio["folder"]
    files = run([*SETTINGS, "--audio_path", str(folder / "a.wav"), str(folder / "a.mp3"), "--events",
                 str(folder / "ev.csv"), "--top_k", "0"])
    assert files.returncode == 0, files.stderr
    expected = {}
    for name, onset, offset, label, p in csv_events(folder / "ev.csv"):
        expected.setdefault(Path(name).suffix, []).append((onset, offset, label, p))
    assert len(expected[".wav"]) >= 3 and any(e[2] == "Sine wave" for e in expected[".wav"])
    stream = [*SETTINGS, "--audio_path", "-", "--events", "-"]
    for name, result, suffix in (
            ("wav", run(stream, audio["wav_stream"]), ".wav"),
            ("s16le", stream_with_a_stall([*stream, "--raw", "s16le", "--input_rate", str(RATE), "--channels", "2"],
                                          audio["s16le"]), ".wav"),
            ("mp3", run(stream, audio["mp3"]), ".mp3")):
        assert result.returncode == 0, (name, result.stderr)
        assert json_events(result.stdout) == sorted(expected[suffix]), name
        assert b"20.0 s of stdin" in result.stderr


def _read_line(proc: subprocess.Popen, timeout: float = 120.0) -> bytes:
    assert select.select([proc.stdout], [], [], timeout)[0], "no line from the program"
    return proc.stdout.readline()


def test_start_lines_come_before_eof_and_signals_close_events(audio: dict, tmp_path: Path, mn04_checkpoint: Path,
                                                            labels_file: Path) -> None:
    silence = np.zeros(32000 * 12, "<i2").tobytes()
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        jsonl, probs = tmp_path / f"ev{code}.jsonl", tmp_path / f"p{code}.npz"
        proc = subprocess.Popen([sys.executable, SCRIPT, *SETTINGS, "--audio_path", "-", "--raw", "s16le",
                                 "--input_rate", "32000", "--events", str(jsonl), "--probabilities", str(probs),
                                 "--top_k", "1", "--wall_clock"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=REPO, bufsize=0)
        proc.stdin.write(silence)
        proc.stdin.flush()
        assert _read_line(proc).startswith(b"Window: 0.00 - 4.00")  # the pipe is still open
        deadline = time.time() + 60
        while not jsonl.exists() or not jsonl.read_text():
            assert time.time() < deadline
            time.sleep(0.1)
        start = json.loads(jsonl.read_text().splitlines()[0])
        assert start["event"] == "start" and start["label"] == "Silence" and start["onset"] == 0.0
        assert "T" in start["time"]
        while not _read_line(proc).startswith(b"Window: 8.00 - 12.00"):  # all 12 s are in
            pass
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert b"Traceback" not in err and f"interrupted by {sig.name}".encode() in err
        lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert lines[-1]["event"] == "end" and lines[-1]["offset"] == 12.0  # closed at the last sample
        with np.load(probs) as data:
            assert data["probabilities"].shape == (9, 527) and data["ends"][-1] == 12.0
        assert not list(tmp_path.glob(".*"))


def test_stall_timeout_ends_the_stream(audio: dict, mn04_checkpoint: Path, labels_file: Path) -> None:
    args = [*SETTINGS, "--audio_path", "-", "--raw", "s16le", "--input_rate", str(RATE), "--channels", "2",
            "--events", "-", "--stall_timeout", "0.5"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, bufsize=0)
    proc.stdin.write(audio["s16le"][:len(audio["s16le"]) // 2 // 4 * 4])  # 10 s
    proc.stdin.flush()
    proc.wait(timeout=300)  # the pipe stays open, nothing more comes
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdin.close()
    assert proc.returncode == 1 and b"error: stdin: no data for 0.5 s (--stall_timeout)" in err
    assert b"Traceback" not in err
    ends = [json.loads(line) for line in out.decode().splitlines() if '"end"' in line]
    assert ends and max(e["offset"] for e in ends) == 10.0  # closed where the stream stopped


def test_a_closed_pipe_ends_an_endless_stream_quietly(mn04_checkpoint: Path, labels_file: Path) -> None:
    result = subprocess.run(["bash", "-c", f"cat /dev/zero | {sys.executable} {SCRIPT} {' '.join(SETTINGS)} "
                             "--audio_path - --raw s16le --input_rate 32000 --events - | head -1; "
                             "echo rc=${PIPESTATUS[1]} >&2"], capture_output=True, cwd=REPO, timeout=300)
    assert json.loads(result.stdout)["label"] == "Silence"
    assert b"rc=0" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--audio_path", "-", "--raw", "s16le"], "--raw needs --input_rate"),
    (["--audio_path", "a.wav", "--raw", "s16le", "--input_rate", "8000"], "describe standard input"),
    (["--audio_path", "-", "--input_rate", "0"], "must be at least 1"),
    (["--audio_path", "-", "x.wav"], "standard input is read alone"),
    (["--mic", "--audio_path", "a.wav"], "exclude each other"),
    ([], "give --audio_path"),
    (["--audio_path", "-", "--wall_clock", "--events", "x.csv"], "--wall_clock dates JSON event lines"),
    (["--audio_path", "a.wav", "--stall_timeout", "5"], "--stall_timeout watches standard input"),
    (["--audio_path", "-", "--stall_timeout", "0"], "--stall_timeout must be a positive"),
])
def test_stream_flags_that_do_not_fit(args: list[str], message: str) -> None:
    import windowed_inference
    with pytest.raises(InputError, match=re.escape(message)):
        windowed_inference.parse_args(args)


def test_bad_streams(audio: dict, mn04_checkpoint: Path, labels_file: Path) -> None:
    wrong_rate = run([*SETTINGS, "--audio_path", "-", "--input_rate", "16000"], audio["wav_stream"])
    assert wrong_rate.returncode == 2
    assert wrong_rate.stderr.decode().strip() == "error: stdin: the stream's header says input_rate 44100, " \
                                                 "--input_rate says 16000"
    text = run([*SETTINGS, "--audio_path", "-"], b"hello, this is not audio\n" * 100)
    assert text.returncode == 2 and text.stderr.startswith(b"error: stdin: not a readable audio stream")
    odd = run([*SETTINGS, "--audio_path", "-", "--raw", "s16le", "--input_rate", "32000", "--events", "-",
               "--threshold", "0.01"], np.zeros(32000 * 3, "<i2").tobytes() + b"\x01")
    assert odd.returncode == 0 and b"1 byte(s) that make no whole sample frame" in odd.stderr
    assert b"shorter than --window_length 4 s: tagged as one window" in odd.stderr  # 3 s: one window of 3 s
    short = json_events(odd.stdout)
    assert short and all(e[:2] == (0.0, 3.0) for e in short)
    signal_ = np.zeros(32000 * 12, "<f4")
    signal_[5 * 32000] = np.nan
    nan = run([*SETTINGS, "--audio_path", "-", "--raw", "f32le", "--input_rate", "32000", "--top_k", "1"],
              signal_.tobytes())
    assert nan.returncode == 0, nan.stderr
    assert nan.stderr.count(b"NaN or infinite samples at 4.990 s") == 1
    starts = [line.split()[1] for line in nan.stdout.decode().splitlines() if line.startswith("Window")]
    assert starts == ["0.00", "6.00", "7.00", "8.00"]  # windows 1-5 hold the NaN


def test_mic_without_sounddevice(tmp_path: Path) -> None:
    """The missing package is simulated: importing it fails, as where it is not installed."""
    code = ("import sys; sys.modules['sounddevice'] = None; sys.argv[0] = 'windowed_inference.py'; "
            f"sys.path.insert(0, {str(REPO)!r}); import windowed_inference as w; from common.errors import run_cli; "
            "sys.exit(run_cli(lambda: w.main(sys.argv[1:])))")
    for args in (["--mic"], ["--list_devices"]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                                timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith("error: --mic needs the sounddevice package") and "pip install" in result.stderr


def test_files_interrupted_keep_what_was_done(audio: dict, tmp_path: Path, mn04_checkpoint: Path,
                                             labels_file: Path) -> None:
    wav = audio["folder"] / "a.wav"
    files = [str(wav)] * 3
    events, probs = tmp_path / "ev.csv", tmp_path / "p.npz"
    proc = subprocess.Popen([sys.executable, SCRIPT, *SETTINGS, "--audio_path", *files, "--events", str(events),
                             "--probabilities", str(probs), "--top_k", "1", "--batch_size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, bufsize=0)
    while not _read_line(proc).startswith(b"Window: 2.00"):
        pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"interrupted by SIGINT" in err and b"Traceback" not in err
    rows = csv_events(events)
    assert rows and rows[0][1] == 0.0 and rows[0][3] == "Silence"
    with np.load(probs) as data:
        assert 3 <= len(data["probabilities"]) < 3 * 17 and (data["file_index"] == 0).all()


def test_full_disk_leaves_no_probabilities_file(audio: dict, tmp_path: Path, mn04_checkpoint: Path,
                                                labels_file: Path) -> None:
    """A file size limit makes writes fail as a full disk does (an OSError from write)."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "p.csv"
    result = run([*SETTINGS, "--audio_path", str(audio["folder"] / "a.wav"), "--probabilities", str(out),
                  "--top_k", "0"], preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode()  # after the progress bar, cleared
    assert err.endswith(f"error: {out}: cannot be written (File too large)\n") and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_the_pipelines_in_the_docs_run(tmp_path: Path, mn04_checkpoint: Path, labels_file: Path) -> None:
    """Each `... | python windowed_inference.py ...` of docs/live-audio.md, fed 3 s of what its left
    side writes (raw PCM, a WAV stream or mp3, at the rate and channels it names)."""
    lines = [line for line in (REPO / "docs" / "live-audio.md").read_text().splitlines()
             if "| python windowed_inference.py" in line]
    assert len(lines) == 4
    for line in lines:
        left, right = line.split("| python windowed_inference.py")
        args = shlex.split(right)
        rate = int(re.search(r"(?:-r|-ar) (\d+)", left).group(1)) if re.search(r"(?:-r|-ar) \d+", left) else 32000
        channels = int(re.search(r"(?:-c|-ac) (\d+)", left).group(1)) if re.search(r"(?:-c|-ac) \d+", left) else 1
        samples = 0.1 * np.random.default_rng(0).standard_normal((3 * rate, channels))
        if "--raw" in args:
            assert args[args.index("--input_rate") + 1] == str(rate)
            data = (samples * 32767).astype("<i2").tobytes()
        elif ".mp3" in left:
            data = encode_mp3(samples.T.astype(np.float32), rate, xing_header=False)
        else:
            sf.write(tmp_path / "x.wav", samples, rate, subtype="PCM_16")
            data = (tmp_path / "x.wav").read_bytes()
            data = data[:4] + b"\xff\xff\xff\xff" + data[8:]
        result = subprocess.run([sys.executable, SCRIPT, *args], input=data, capture_output=True, cwd=tmp_path,
                                timeout=300)
        assert result.returncode == 0, (line, result.stderr)
        out = result.stdout if "-" == args[args.index("--events") + 1] else (tmp_path / "events.jsonl").read_bytes()
        assert all(json.loads(x)["event"] in ("start", "end") for x in out.splitlines())


class _FakeSounddevice:
    """Just enough of sounddevice for datasets.mic: one 16-kHz input device whose callback the test calls."""
    PortAudioError = RuntimeError

    def __init__(self) -> None:
        self.stream = None

    def query_devices(self, device=None, kind=None):
        info = {"name": "fake mic", "max_input_channels": 1, "default_samplerate": 16000.0}
        if device is None and kind is None:
            return [info]
        if device not in (None, 0):
            raise ValueError(f"no device {device!r}")
        return info

    def InputStream(self, callback, **kwargs):  # noqa: N802 (sounddevice's name)
        test = self

        class Stream:
            def __enter__(self):
                test.stream = self
                return self

            def __exit__(self, *exc):
                return False

        self.callback = callback
        return Stream()


def test_a_microphone_that_falls_behind_drops_whole_hops(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from datasets import mic
    fake = _FakeSounddevice()
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    with pytest.raises(mic.AudioLoadError, match="input devices: 0: fake mic"):
        mic.Microphone("7", 1.0, 2.0)
    source = mic.Microphone(None, hop_seconds=0.5, max_behind_seconds=1.0)  # hop 8000 samples, 16000 behind
    blocks = source.blocks()
    for i in range(40):  # 4 s recorded while the reader was busy: 0.1-s blocks
        fake.callback(np.full((1600, 1), i, np.float32), 1600, None, None)
    first = next(blocks)  # 4 s waiting, 1 s may: 3 s (6 hops) dropped, the oldest
    assert source.dropped_seconds == 3.0 and first[0, 0] == 30 and first.shape[1] == 8000
    assert caplog.text.count("cannot keep up") == 1
    rest = [next(blocks) for _ in range(5)]  # the last 0.5 s, no longer behind: nothing more dropped
    assert source.dropped_seconds == 3.0 and [b[0, 0] for b in rest] == [35, 36, 37, 38, 39]
