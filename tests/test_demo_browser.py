"""The web page (demo.py) in a real headless browser: Debian's Chromium driven by Playwright.

One server on 127.0.0.1 (a free port) for the module, stopped at its end. The page tags an
uploaded clip (tags, timeline image, event rows, downloads) and the demo clip in one click; bad
files each get one line and the server goes on; a long upload shows its progress; two browsers at
once get their own results; the Live tab, fed by Chromium's fake microphone playing a generated
WAV, shows tags and events while the stream runs. Every request the pages make, and every
connection the server opens, stays on this machine. A screenshot of each state goes to
$EFFICIENTAT_SCREENSHOTS (or a temporary folder). Skipped, with the reason, without Gradio,
Playwright or Chromium (requirements-demo.txt and the apt line of .ci/run install them).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import soundfile as sf

from tests import browser
from tests.datagen import bells_clip

pytestmark = [pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing())),
              # Gradio's own (local) event statistics use pandas options that pandas 3 deprecates
              pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|The copy keyword).*")]

MAX_UPLOAD_MB = 20
REQUESTS: list[str] = []  # every URL the pages of this module requested
OUTSIDE: list[str] = []  # every host outside this machine the server tried to reach
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("EFFICIENTAT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(1)
    t = np.arange(8 * 16000) / 16000
    sf.write(folder / "tone.flac", (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), 16000)
    (folder / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + rng.bytes(4000))
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "nothing.wav", np.zeros(0, np.float32), 32000)
    (folder / "huge.wav").write_bytes(rng.bytes((MAX_UPLOAD_MB + 1) << 20))
    return {"bells": bells_clip(folder / "bells.wav", sr=44100), "tone": folder / "tone.flac",
            "long": bells_clip(folder / "long.wav", before=150.0, after=24.0, sr=16000),
            "live": bells_clip(folder / "live.wav", before=1.0, after=1.0, sr=48000, repeats=4),
            **{p.stem: p for p in folder.iterdir() if p.stem in ("garbage", "empty", "nothing", "huge")}}


@pytest.fixture(scope="module")
def server(mn04_checkpoint: Path, labels_file: Path) -> Iterator[str]:
    """The page on 127.0.0.1 (in this process, so that its connections can be watched)."""
    from helpers.demo.models import Taggers
    from helpers.demo.page import Page, serve

    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def watched_connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not browser.is_local_host(address[0]):
            OUTSIDE.append(str(address[0]))
        return connect(sock, address)

    def watched_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host and not browser.is_local_host(host):
            OUTSIDE.append(host)
        return lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", watched_connect)
        patch.setattr(socket, "getaddrinfo", watched_lookup)
        port = browser.free_port()
        blocks = serve(Page(Taggers()), port, MAX_UPLOAD_MB, block=False)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            blocks.close()


@pytest.fixture(scope="module")
def pw() -> Iterator[Any]:
    with browser.playwright() as p:
        yield p


@pytest.fixture(scope="module")
def chrome(pw: Any) -> Iterator[Any]:
    with browser.chromium(pw) as b:
        yield b


def upload(page: Any, path: Path) -> None:
    """Drop `path` on the upload box (clearing what it holds first)."""
    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=WAIT_MS)
    page.set_input_files("#upload input[type=file]", str(path))


def set_number(page: Any, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(f"{value:g}")
    box.press("Enter")


def text(page: Any, elem_id: str) -> str:
    """The text of an element, file names joined (the page shows their suffixes apart)."""
    return page.locator(f"#{elem_id}").inner_text().replace("\n.", ".")


def wait_for_tags(page: Any, name: str, where: str = "tags") -> str:
    page.wait_for_function(f"document.querySelector('#summary')?.innerText.includes({name!r})", timeout=WAIT_MS)
    return page.locator(f"#{where}").inner_text()


def test_an_uploaded_clip_gets_tags_a_timeline_and_events(server: str, chrome: Any, clips: dict[str, Path],
                                                          shots: Path) -> None:
    page = browser.open_page(chrome, server, REQUESTS)
    page.screenshot(path=shots / "01_loaded.png", full_page=True)
    set_number(page, "window", 2)
    upload(page, clips["bells"])
    tags = wait_for_tags(page, "bells.wav")
    assert "Ding" in tags or "Clang" in tags
    image = page.locator("#timeline img")
    image.wait_for(timeout=WAIT_MS)
    assert page.evaluate("document.querySelector('#timeline img').naturalWidth") >= 800
    rows = page.locator("#events tbody tr")
    assert rows.count() >= 1 and any(bell in page.locator("#events").inner_text() for bell in ("Ding", "Clang"))
    assert "bells_mn04_as_events.csv" in text(page, "downloads")
    assert "bells_mn04_as_embedding.npy" in text(page, "downloads")
    page.screenshot(path=shots / "02_tagged.png", full_page=True)
    page.get_by_text("the demo clip (bells, 6 s)").click()
    tags = wait_for_tags(page, "demo_bells.wav")
    assert tags.split()[:2] == ["mn04_as", "on"] and "Clang" in tags and "0.589" in tags  # the README's tags
    page.screenshot(path=shots / "03_demo_clip.png", full_page=True)
    page.context.close()


@pytest.mark.parametrize("name, line", [("garbage", "garbage.wav: not a readable audio file"),
                                        ("empty", "empty.wav: file is empty"),
                                        ("nothing", "nothing.wav: contains no audio samples")])
def test_a_bad_file_is_one_line_and_the_server_goes_on(name: str, line: str, server: str, chrome: Any,
                                                       clips: dict[str, Path], shots: Path) -> None:
    page = browser.open_page(chrome, server, REQUESTS)
    upload(page, clips[name])
    page.wait_for_selector("#error .ea-error", timeout=WAIT_MS)
    message = page.locator("#error").inner_text().strip()
    assert message.startswith(f"error: {line}") and "\n" not in message and "/tmp" not in message
    page.screenshot(path=shots / f"04_bad_{name}.png", full_page=True)
    upload(page, clips["tone"])  # the next file is analysed as usual, the message gone
    wait_for_tags(page, "tone.flac")
    assert page.locator("#error .ea-error").count() == 0
    page.context.close()


def test_a_file_over_the_size_limit_is_refused_before_it_is_sent(server: str, chrome: Any,
                                                                 clips: dict[str, Path], shots: Path) -> None:
    page = browser.open_page(chrome, server, REQUESTS)
    upload(page, clips["huge"])
    refusal = page.get_by_text(f"exceed the maximum allowed size of {MAX_UPLOAD_MB:.1f} Mb")
    refusal.first.wait_for(timeout=WAIT_MS)
    assert "huge.wav" in refusal.first.inner_text()
    page.screenshot(path=shots / "05_too_large.png", full_page=True)
    upload(page, clips["tone"])
    wait_for_tags(page, "tone.flac")
    page.context.close()


def test_a_long_upload_shows_its_progress(server: str, chrome: Any, clips: dict[str, Path], shots: Path) -> None:
    page = browser.open_page(chrome, server, REQUESTS)
    upload(page, clips["long"])
    page.get_by_text("of 3:00").first.wait_for(timeout=WAIT_MS)  # "windows: 0:40 of 3:00", then "clip tags: ..."
    page.screenshot(path=shots / "06_progress.png", full_page=True)
    wait_for_tags(page, "long.wav")
    assert "3:00 analysed" in page.locator("#summary").inner_text()
    page.context.close()


def test_two_browsers_at_once_get_their_own_results(server: str, chrome: Any, clips: dict[str, Path],
                                                     shots: Path) -> None:
    from helpers.inference.api import Tagger

    pages = {name: browser.open_page(chrome, server, REQUESTS) for name in ("bells", "tone")}
    for name, page in pages.items():
        upload(page, clips[name])
    expected = {name: Tagger("mn04_as").tag(str(clips[name]), top_k=3) for name in pages}
    for name, page in pages.items():
        tags = wait_for_tags(page, clips[name].name)
        for label, probability in expected[name]:
            assert label in tags and f"{probability:.3f}" in tags
        assert clips[name].stem in text(page, "downloads")
        page.screenshot(path=shots / f"07_two_browsers_{name}.png", full_page=True)
    assert expected["bells"][0][0] != expected["tone"][0][0]
    for page in pages.values():
        page.context.close()


def start_recording(page: Any) -> None:
    """Press Record on the Live tab. Gradio loads its WAV recorder a moment after the page: a press
    before it is there fails in the browser ("... is not a constructor"), and is pressed again."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for _ in range(10):
        page.locator("#live-mic button", has_text="Record").first.click()
        page.wait_for_timeout(2000)
        if not any("constructor" in e for e in errors):
            return
        errors.clear()
        page.locator("#live-mic button", has_text="Stop").first.click()
        page.wait_for_timeout(500)
    raise AssertionError("the browser's recorder did not start")


def test_the_live_tab_tags_the_microphone_while_it_streams(server: str, pw: Any, clips: dict[str, Path],
                                                           shots: Path) -> None:
    with browser.chromium(pw, fake_audio=clips["live"]) as live_browser:
        page = browser.open_page(live_browser, server, REQUESTS, microphone=True)
        set_number(page, "window", 2)
        page.get_by_role("tab", name="Live").click()
        start_recording(page)
        page.wait_for_selector("#live-tags .ea-tags", timeout=WAIT_MS)
        assert "the latest window" in page.locator("#live-tags").inner_text()
        assert "listening" in page.locator("#live-status").inner_text()
        page.wait_for_function("/Ding|Clang|Bell|Chime/.test(document.querySelector('#live-events')?.innerText)",
                               timeout=WAIT_MS)  # an event has started while the stream runs
        page.wait_for_selector("#live-timeline img", timeout=WAIT_MS)
        page.screenshot(path=shots / "08_live.png", full_page=True)
        page.locator("#live-mic button", has_text="Stop").first.click()
        page.wait_for_function("document.querySelector('#live-status')?.innerText.includes('stopped')",
                               timeout=WAIT_MS)
        assert "live_mn04_as_events.csv" in text(page, "live-downloads")
        page.screenshot(path=shots / "09_live_stopped.png", full_page=True)


def test_nothing_is_requested_from_other_hosts(server: str, chrome: Any) -> None:
    """Every URL of every page above (and of one more), and every connection of the server, is local."""
    page = browser.open_page(chrome, server, REQUESTS)
    page.wait_for_timeout(1000)
    page.context.close()
    assert len(REQUESTS) > 20
    assert [u for u in REQUESTS if not browser.is_local(u)] == []
    assert OUTSIDE == []
