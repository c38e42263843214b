"""The README's commands work: every command in its bash blocks is either run here (the cheap
ones, in a temporary folder) or named with the test that runs it; the first command prints the
README's expected output in a fresh process with an empty cache (the shipped model and labels);
every `python benchmarks/...` it mentions exists; the README stays short and its links resolve.
A new README command fails here until it is run or its test is named."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
# pages that other work writes; the README links them already
OTHER_PAGES = ("docs/live-audio.md", "docs/long-recordings.md", "docs/small-data.md", "docs/architecture.md")
FIRST_COMMAND = "python inference.py --model_name mn04_as --audio_path resources/demo_bells.wav"
# command -> files it writes; run in-process in a temporary folder beside a link to resources/
RUN_HERE = {
    "python inference.py --model_name mn04_as --audio_path resources/demo_bells.wav --top_k 3 --output tags.json":
        ["tags.json"],
    "python windowed_inference.py --model_name mn04_as --audio_path resources/demo_bells.wav --window_length 2 "
    "--hop_length 1 --events events.csv": ["events.csv"],
    "python embeddings.py --model_name mn04_as --audio_path resources/demo_bells.wav --output demo_mn04.npz":
        ["demo_mn04.npz"],
    "python complexity.py --model_name dymn10_as": [],
}
# command -> (test file, test function) that runs it, or what runs it where no test can
RUN_ELSEWHERE = {
    "pip install -r requirements.txt": (".ci/run", "pip install"),
    "python -m pytest -q": (".ci/run", "pytest -q"),
    FIRST_COMMAND: ("tests/test_readme.py", "test_first_command_prints_the_expected_output_offline"),
    "python ex_custom.py --pretrained_name mn04_as --dataset_dir my_sounds --clip_length 5":
        ("tests/test_finetune_scripts.py", "test_custom_tones_vs_noise_reaches_full_accuracy"),
    "python ex_audioset.py --model_name=mn10_as --dataset_dir=/data/audioset":
        ("tests/test_audioset.py", "test_evaluation_parity_with_sklearn_and_direct_inference"),
    "arecord -q -f S16_LE -r 32000 -c 1 -t raw | python windowed_inference.py --model mn04_as --audio_path - "
    "--raw s16le --input_rate 32000 --hop_length 1 --events -":
        ("tests/test_live_audio.py", "test_the_pipelines_in_the_docs_run"),
    "python corpus.py --audio_path my_corpus --output my_table --all_classes --embeddings":
        ("tests/test_corpus.py", "test_cluster_job_equals_single_process_and_survives_a_killed_actor"),
    "python export_onnx.py --model_name mn04_as --with_frontend --output mn04_as_frontend.onnx --check "
    "resources/demo_bells.wav": ("tests/test_onnx_export.py", "test_cli_exports_mn04_with_frontend_and_checks"),
    "python demo.py --port 7860": ("tests/test_demo.py", "test_demo_py_serves_the_page_until_stopped"),
}


def bash_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_run_by_a_test():
    commands = bash_commands(README)
    assert FIRST_COMMAND in commands and len(commands) >= 8
    unknown = [c for c in commands if c not in RUN_HERE and c not in RUN_ELSEWHERE]
    assert not unknown, f"README commands that no test runs (add them to tests/test_readme.py): {unknown}"
    for command, (path, marker) in RUN_ELSEWHERE.items():
        text = (REPO / path).read_text()
        expected = f"def {marker}(" if path.endswith(".py") else marker
        assert expected in text, f"{path} does not hold {expected!r} (for {command!r})"
        script = command.split()[1]
        if script.endswith(".py") and not path.endswith("test_readme.py"):
            assert Path(script).stem in text, f"{path} does not run {script}"
    stale = [c for c in [*RUN_HERE, *RUN_ELSEWHERE] if c not in commands]
    assert not stale, f"tests/test_readme.py lists commands the README no longer shows: {stale}"


def test_benchmarks_the_readme_names_exist():
    named = set(re.findall(r"python (benchmarks/\w+\.py)", README))
    assert {"benchmarks/bench_inference.py", "benchmarks/bench_first_contact.py"} <= named
    assert all((REPO / path).is_file() for path in named), named


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (REPO / target).exists() or target in OTHER_PAGES, target
    assert "## Python API" in README and "## What happens when ..." in README and "## Layout" in README


def expected_first_output() -> str:
    block = README.split("Expected output:", 1)[1]
    return re.search(r"```\n(.*?)```", block, flags=re.S).group(1)


def test_first_command_prints_the_expected_output_offline(tmp_path):
    """A fresh process, an empty cache and no ../shared: the shipped checkpoint and labels suffice."""
    env = {**os.environ, "EFFICIENTAT_MODEL_DIR": str(tmp_path / "empty_cache")}
    result = subprocess.run([sys.executable, *FIRST_COMMAND.split()[1:]], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_first_output()
    assert not (tmp_path / "empty_cache").exists() or not any((tmp_path / "empty_cache").iterdir())


@pytest.mark.parametrize("command", list(RUN_HERE))
def test_cheap_readme_commands_run(command, tmp_path, monkeypatch, capsys, mn04_checkpoint, labels_file):
    (tmp_path / "resources").symlink_to(REPO / "resources")
    monkeypatch.chdir(tmp_path)
    script, *argv = command.split()[1:]
    code = importlib.import_module(Path(script).stem).main(argv)
    assert code in (0, None)
    printed = capsys.readouterr().out
    for output in RUN_HERE[command]:
        assert (tmp_path / output).stat().st_size > 0, output
    if script == "inference.py":
        assert "Clang: 0.589" in printed
    if script == "windowed_inference.py":
        assert "Ding" in (tmp_path / "events.csv").read_text()
    if script == "embeddings.py":
        assert np.load(tmp_path / "demo_mn04.npz")["embeddings"].shape == (1, 384)
    if script == "complexity.py":
        assert "Model 'dymn10_as' has" in printed
