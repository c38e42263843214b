"""The web page (demo.py): its memory on a long upload next to the windowed command's, and the
screenshot of docs/demo.md.

    python benchmarks/bench_demo.py --minutes 60                 # one hour: page vs windowed_inference.py
    python benchmarks/bench_demo.py --screenshot docs/demo.png   # the page on the demo clip

The memory run writes a recording (faint noise with the demo clip's bells every minute, 32 kHz
16-bit, written block by block), runs `windowed_inference.py` on it with the page's settings
(mn04_as, 10-s windows, 1-s hop, --events and --plot, one thread) and then `demo.py`, into
which headless Chromium uploads the same file; it prints the wall time and the peak RSS
(VmHWM) of each process, and the page server's RSS before the upload. Needs
requirements-demo.txt and Debian's chromium (tests/browser.py).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from resources.make_demo import SAMPLE_RATE, bells  # noqa: E402
from tests import browser  # noqa: E402

SETTINGS = ["--model_name", "mn04_as", "--window_length", "10", "--hop_length", "1"]


def write_recording(path: Path, minutes: float) -> None:
    """Faint noise with the bells every 60 s, written a minute at a time."""
    rng, ring = np.random.default_rng(0), bells()
    with sf.SoundFile(path, "w", SAMPLE_RATE, 1, subtype="PCM_16") as f:
        for _ in range(int(round(minutes))):
            minute = 0.003 * rng.standard_normal(60 * SAMPLE_RATE)
            minute[20 * SAMPLE_RATE:20 * SAMPLE_RATE + len(ring)] += ring
            f.write(minute.astype(np.float32))


def status_mib(pid: int, field: str) -> float:
    """VmRSS or VmHWM (the peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for process {pid}")


def run_command(path: Path, out: Path) -> tuple[float, float]:
    """windowed_inference.py with the page's settings: (wall seconds, peak RSS MiB)."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, str(ROOT / "windowed_inference.py"), "--audio_path", str(path),
                                *SETTINGS, "--threads", "1", "--top_k", "0", "--events", str(out / "events.csv"),
                                "--plot", str(out / "plot.png")], stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"windowed_inference.py failed ({status})")
    return time.monotonic() - started, usage.ru_maxrss / 1024


def run_page(path: Path, shots: Path) -> tuple[float, float, float]:
    """demo.py with the file uploaded by Chromium: (wall seconds from the upload to the tags, RSS
    before the upload, peak RSS), both MiB; a screenshot of the progress and of the result."""
    port = browser.free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--port", str(port), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        with browser.playwright() as p, browser.chromium(p) as chrome:
            page = browser.open_page(chrome, url, [])
            before = status_mib(server.pid, "VmRSS")
            started = time.monotonic()
            page.set_input_files("#upload input[type=file]", str(path))
            page.get_by_text("windows: ").first.wait_for(timeout=600_000)
            page.screenshot(path=shots / "long_progress.png", full_page=True)
            page.wait_for_function(f"document.querySelector('#summary')?.innerText.includes({path.name!r})",
                                   timeout=3_600_000)
            wall = time.monotonic() - started
            page.screenshot(path=shots / "long_result.png", full_page=True)
        return wall, before, status_mib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(30)


def screenshot(target: Path) -> None:
    """The page on the demo clip (one click on the example), as docs/demo.md shows it."""
    from helpers.demo.models import Taggers
    from helpers.demo.page import Page, serve

    port = browser.free_port()
    blocks = serve(Page(Taggers()), port, 4096, block=False)
    try:
        with browser.playwright() as p, browser.chromium(p) as chrome:
            page = browser.open_page(chrome, f"http://127.0.0.1:{port}/", [])
            page.get_by_text("the demo clip (bells, 6 s)").click()
            page.wait_for_function("document.querySelector('#summary')?.innerText.includes('demo_bells.wav')",
                                   timeout=120_000)
            page.wait_for_selector("#timeline img", timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(target), full_page=True)
    finally:
        blocks.close()
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} kB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the generated recording")
    parser.add_argument("--keep", default=None, help="write the recording here (and reuse it if it exists)")
    parser.add_argument("--shots", default=None, help="folder for screenshots of the long upload")
    parser.add_argument("--screenshot", default=None, help="only write the page's screenshot on the demo clip here")
    args = parser.parse_args()
    if browser.missing():
        raise SystemExit(f"error: {browser.missing()}")
    if args.screenshot:
        screenshot(Path(args.screenshot))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "long.wav"
        if not path.exists():
            write_recording(path, args.minutes)
        shots = Path(args.shots or tmp)
        shots.mkdir(parents=True, exist_ok=True)
        minutes = sf.info(str(path)).duration / 60
        command_wall, command_peak = run_command(path, Path(tmp))
        page_wall, page_before, page_peak = run_page(path, shots)
    print(f"{minutes:.0f} min, mn04_as, 10-s windows, 1-s hop, 1 thread ({os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f})")
    print(f"windowed_inference.py --events --plot: {command_wall:.1f} s, peak RSS {command_peak:.0f} MiB")
    print(f"demo.py, upload to tags: {page_wall:.1f} s, RSS {page_before:.0f} MiB before the upload, "
          f"peak {page_peak:.0f} MiB (growth {page_peak - page_before:.0f} MiB)")


if __name__ == "__main__":
    main()
