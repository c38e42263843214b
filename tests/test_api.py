"""The Python API (efficientat.Tagger, helpers/inference/api.py) with the shipped mn04_as: the same
numbers as the commands for files and arrays, chunking, events, one-line ValueErrors, torch.hub,
and the README's "Python API" examples run verbatim."""
from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

import inference
from common.errors import InputError
from efficientat import Event, Tagger
from helpers.inference.sed import detect_events, tag_windows
from helpers.inference.resolve import resolve_model
from tests.conftest import REPO

DEMO = REPO / "resources" / "demo_bells.wav"


@pytest.fixture(scope="module")
def tagger(mn04_checkpoint, labels_file) -> Tagger:
    return Tagger("mn04_as", batch_size=4)


@pytest.fixture(scope="module")
def demo() -> tuple[np.ndarray, int]:
    waveform, rate = sf.read(DEMO, dtype="float32")
    return waveform, rate


def test_file_tags_are_the_commands_tags(tagger, demo):
    tags = tagger.tag(str(DEMO), top_k=3)
    assert [name for name, _ in tags] == ["Clang", "Ding", "Singing bowl"]
    assert [round(p, 3) for _, p in tags] == [0.589, 0.537, 0.069]  # inference.py's printout
    reference = resolve_model("mn04_as").predict(demo[0])
    np.testing.assert_allclose(tagger.probabilities(DEMO), reference, rtol=0, atol=1e-6)


def test_arrays_of_every_layout_and_rate(tagger, demo):
    waveform, rate = demo
    one = tagger.probabilities(waveform, sample_rate=rate)
    assert one.shape == (1, 527) and one.dtype == np.float32
    stereo = np.stack([waveform, waveform])
    np.testing.assert_allclose(tagger.probabilities(stereo, sample_rate=rate), one, atol=1e-6)
    np.testing.assert_allclose(tagger.probabilities(torch.from_numpy(waveform), sample_rate=rate), one, atol=1e-6)
    pcm = np.round(waveform * 32768).astype(np.int16)  # the wav's own 16-bit samples
    np.testing.assert_allclose(tagger.probabilities(pcm, sample_rate=rate), one, atol=1e-6)
    resampled = soxr.resample(waveform, rate, 44100, quality="HQ")
    np.testing.assert_allclose(tagger.probabilities(resampled, sample_rate=44100), one, atol=5e-3)
    batch = tagger.probabilities(np.stack([stereo, 0.5 * stereo, stereo]), sample_rate=rate)
    assert batch.shape == (3, 527)
    np.testing.assert_allclose(batch[[0, 2]], np.repeat(one, 2, axis=0), atol=1e-5)
    assert not np.allclose(batch[1], one[0], atol=1e-3)  # a quieter clip tags differently
    tags = tagger.tag([str(DEMO), waveform[:rate]], sample_rate=rate, top_k=2)
    assert len(tags) == 2 and tags[0][0][0] == "Clang" and len(tags[1]) == 2


def test_embeddings(tagger, demo):
    waveform, rate = demo
    pooled = tagger.embed(waveform, sample_rate=rate)
    assert pooled.shape == (1, 384) and pooled.dtype == np.float32
    np.testing.assert_allclose(tagger.embed(DEMO), pooled, atol=1e-5)
    np.testing.assert_allclose(tagger.embed(waveform, sample_rate=rate, layer=-1), pooled, atol=1e-4)
    assert tagger.embed([waveform, waveform[:rate]], sample_rate=rate, layer=5).shape == (2, 16)


def test_long_arrays_are_chunked_like_files(tagger, demo, tmp_path):
    waveform, rate = demo
    long = np.tile(waveform, 11)[: 62 * rate]  # over CHUNK_SECONDS
    sf.write(tmp_path / "long.wav", long, rate, subtype="FLOAT")
    from_file = tagger.probabilities(tmp_path / "long.wav")
    np.testing.assert_allclose(tagger.probabilities(long, sample_rate=rate), from_file, atol=1e-6)
    whole = resolve_model("mn04_as").predict(long)
    assert np.abs(from_file - whole).max() < 0.02  # chunks combine as one pass would


def test_events_equal_windowed_inference(tagger, demo):
    waveform, rate = demo
    silence = np.zeros(8 * rate, dtype=np.float32)
    recording = np.concatenate([silence, waveform, silence])
    events = tagger.detect(recording, sample_rate=rate, window=2.0, hop=1.0, threshold=0.3)
    assert events and all(isinstance(e, Event) for e in events)
    bells = [e for e in events if e.event_label in ("Clang", "Ding")]
    assert bells and all(7.0 <= e.onset and e.offset <= 15.0 for e in bells), events
    reference = detect_events(tag_windows(tagger.loaded, DEMO, 2.0, 1.0, progress=False), tagger.class_names, 0.3)
    assert tagger.detect(DEMO, window=2.0, hop=1.0) == reference
    assert [e.event_label for e in tagger.detect(waveform, sample_rate=rate, window=2.0, hop=1.0)] == \
        [e.event_label for e in reference]


def cli_error(*argv: str) -> str:
    with pytest.raises(InputError) as error:
        inference.main(["--model_name", "mn04_as", *argv])
    return str(error.value)


def test_bad_input_is_a_value_error_with_the_commands_message(tagger, demo, tmp_path):
    waveform, rate = demo
    missing = str(tmp_path / "missing.wav")
    with pytest.raises(ValueError) as error:
        tagger.tag(missing)
    assert str(error.value) == cli_error("--audio_path", missing) == f"{missing}: no such file or folder"
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(ValueError) as error:
        tagger.tag([broken])
    message = str(error.value)
    assert message.startswith(f"{broken}: ") and "\n" not in message
    with pytest.raises(ValueError, match=r"^unknown model name 'mn04_sa'; did you mean mn04_as"):
        Tagger("mn04_sa")
    for audio, rate_given, problem in [
            (waveform, None, "audio: give the sample rate of arrays"),
            (np.full(rate, np.nan, dtype=np.float32), rate, "audio: contains non-finite samples (NaN or "
                                                            "infinity), the first at 0.000 s"),
            (np.zeros((rate, 2), dtype=np.float32), rate, "audio: a 2-D array is one recording (channels, samples)"),
            (np.zeros(1, dtype=np.float32), rate, "audio: too short to analyze (1 sample)"),
            (np.zeros((1, 1, 1, 9)), rate, "audio: expected (samples,), (channels, samples) or"),
            ([], rate, "audio must be a path, an array or a non-empty list of them"),
            ([waveform, 3], rate, "audio[1]: expected a path or a 1-D or 2-D array, got int")]:
        with pytest.raises(ValueError) as error:
            tagger.tag(audio, sample_rate=rate_given)
        assert str(error.value).startswith(problem) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="hop_length must be positive"):
        tagger.detect(waveform, sample_rate=rate, window=2.0, hop=0.0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' asked for, but PyTorch sees no CUDA GPU"):
            Tagger("mn04_as", device="cuda")


def test_ensemble_checkpoint_and_onnx(tagger, demo, tmp_path):
    waveform, rate = demo
    one = tagger.probabilities(waveform, sample_rate=rate)
    np.testing.assert_allclose(Tagger(["mn04_as", "mn04_as"]).probabilities(waveform, sample_rate=rate), one,
                               atol=1e-5)
    from helpers.inference.onnx_export import export_onnx
    from models.factory import create_frontend, create_model
    onnx_path = tmp_path / "mn04.onnx"
    export_onnx(create_model("mn04_as").eval(), onnx_path, create_frontend("mn04_as"))
    onnx_tags = Tagger(onnx_path).tag(waveform, sample_rate=rate, top_k=2)
    assert [n for n, _ in onnx_tags] == ["Clang", "Ding"] and abs(onnx_tags[0][1] - 0.5885) < 1e-3
    with pytest.raises(ValueError, match="an ONNX model runs on the CPU in fp32"):
        Tagger(onnx_path, precision="bf16")
    with pytest.raises(ValueError, match="no_such_run/best.pt"):
        Tagger("no_such_run/best.pt")


def test_torch_hub_gives_the_same_tagger(tagger):
    hub = torch.hub.load(str(REPO), "tagger", "mn04_as", source="local")
    assert isinstance(hub, Tagger) and hub.tag(DEMO, top_k=1) == tagger.tag(DEMO, top_k=1)


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def test_readme_python_examples_run_verbatim(mn04_checkpoint, labels_file, monkeypatch, capsys):
    """Every ```python block of the README's "Python API" section, in order, in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Python API"), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    shown = [line.split("  # ", 1)[1] for block in blocks for line in block.splitlines()
             if line.startswith("print(") and "  # " in line]
    assert printed == shown  # every print's output is the comment beside it
