"""First contact: how long a newcomer waits from `git clone` to the README's first tags.

    python benchmarks/bench_first_contact.py                  # clone this repository's HEAD
    python benchmarks/bench_first_contact.py --skip_install   # without the fresh venv

In a temporary folder, with an empty user cache (so only the shipped files can be used): clones the
repository, runs the README's first command with this Python (packages installed), then creates a
fresh venv, installs `torch==2.13.0` and `requirements.txt` into it and runs the command again.
Prints the time of each step, the totals with and without the install, and the first command's
wall time and peak RSS from `/usr/bin/time -v` where it exists.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_COMMAND = ["inference.py", "--model_name", "mn04_as", "--audio_path", "resources/demo_bells.wav"]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds `command` took, and its stdout; raises if it fails."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start, result.stdout


def first_command(python: str, clone: Path, env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of the README's first command, and a note with /usr/bin/time's figures."""
    time_tool = Path("/usr/bin/time")
    if not time_tool.exists():
        return timed([python, *FIRST_COMMAND], clone, env)[0], "(no /usr/bin/time: peak RSS not measured)"
    report = clone.parent / "time.txt"
    seconds, _ = timed([str(time_tool), "-v", "-o", str(report), python, *FIRST_COMMAND], clone, env)
    text = report.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", text).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return seconds, f"/usr/bin/time -v: wall {wall}, peak RSS {rss / 1024:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO), help="repository to clone (default: this one)")
    parser.add_argument("--skip_install", action="store_true", help="skip the fresh venv and pip install")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="first_contact_") as tmp:
        tmp_path = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "EFFICIENTAT_MODEL_DIR"}
        env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # an empty user cache
        clone_s, _ = timed(["git", "clone", "-q", args.source, str(tmp_path / "repo")], tmp_path, env)
        clone = tmp_path / "repo"
        run_s, note = first_command(sys.executable, clone, env)
        print(f"git clone: {clone_s:.1f} s")
        print(f"first command, packages installed: {run_s:.1f} s ({note})")
        print(f"clone to first tags, install excluded: {clone_s + run_s:.1f} s")
        if args.skip_install:
            return
        venv = tmp_path / "venv"
        install_s = timed([sys.executable, "-m", "venv", str(venv)], tmp_path, env)[0]
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        install_s += timed([*pip, "torch==2.13.0"], clone, env)[0]
        install_s += timed([*pip, "-r", "requirements.txt"], clone, env)[0]
        venv_s, _ = timed([str(venv / "bin" / "python"), *FIRST_COMMAND], clone, env)
        print(f"fresh venv + pip install: {install_s:.1f} s; first command in it: {venv_s:.1f} s")
        print(f"clone to first tags, install included: {clone_s + install_s + venv_s:.1f} s")
        shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    main()
