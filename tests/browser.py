"""Headless Chromium for the web page's tests and the page's benchmark: Debian's /usr/bin/chromium,
driven by Playwright (never a browser of Playwright's own), and the page served on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlparse

CHROMIUM = os.environ.get("EFFICIENTAT_CHROMIUM", "/usr/bin/chromium")
# the flags known to work on a closed machine (no background connections, no sandbox as root)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions"]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def missing() -> Optional[str]:
    """Why the browser tests cannot run here (None if they can)."""
    try:
        import gradio  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"the page's packages are missing ({e}): pip install -r requirements-demo.txt"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt install chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def is_local(url: str) -> bool:
    """True for a request that stays on this machine (blob: and data: URLs are the page's own)."""
    if url.startswith("data:"):
        return True
    if url.startswith("blob:"):
        url = url[len("blob:"):]
    return is_local_host(urlparse(url).hostname or "")


@contextlib.contextmanager
def playwright() -> Iterator[Any]:
    """Playwright (one per process and thread), to launch browsers with `chromium`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@contextlib.contextmanager
def chromium(p: Any, fake_audio: Optional[Path] = None, extra: Sequence[str] = ()) -> Iterator[Any]:
    """A headless Chromium (Playwright's Browser; Playwright starts it with a new empty profile
    folder of its own); with `fake_audio`, a fake microphone playing that WAV file (looped), allowed
    without asking."""
    args = [*FLAGS, *extra]
    if fake_audio is not None:
        args += ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--use-file-for-fake-audio-capture={fake_audio}"]
    browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
    try:
        yield browser
    finally:
        browser.close()


def open_page(browser: Any, url: str, requests: list[str], microphone: bool = False) -> Any:
    """A new page (its own context: its own cookies and session) at `url`, recording every URL it requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  permissions=["microphone"] if microphone else [])
    page = context.new_page()
    page.on("request", lambda r: requests.append(r.url))
    page.on("websocket", lambda w: requests.append(w.url))
    page.goto(url)
    page.wait_for_selector("#upload input[type=file]", state="attached", timeout=60_000)
    page.wait_for_selector("#tags .ea-note", timeout=60_000)  # the page has rendered its parts
    return page
