"""How the web page shows results: HTML for the tags and lines of text, no framework involved."""
from __future__ import annotations

import base64
import html
from typing import Optional, Sequence

from helpers.demo.analysis import Analysis, Settings, clock
from helpers.demo.live import Snapshot

LOST_NOTED = 2.0  # seconds of lost microphone audio worth a note (a piece or two lag behind at any time)

# the page's own styles (system fonts; nothing is fetched from elsewhere)
CSS = """
.ea-tags table { width: 100%; border-collapse: collapse; font-size: 15px; margin: 0; border: 0 !important; }
.ea-tags tr, .ea-tags td { border: 0 !important; background: transparent !important; }
.ea-tags td { padding: 3px 6px !important; }
.ea-tags tr + tr td { border-top: 1px solid var(--border-color-primary) !important; }
.ea-tags td.ea-label { width: 38%; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.ea-tags td.ea-p { width: 4.5em; text-align: right; font-variant-numeric: tabular-nums; }
.ea-bar { background: var(--neutral-100); border-radius: 3px; height: 14px; }
.ea-bar > span { display: block; height: 14px; border-radius: 3px; background: #3b6fb6; }
.ea-tags .ea-head { font-weight: 600; margin: 2px 6px 8px; }
.ea-timeline img { width: 100%; height: auto; }
.ea-error { color: #b42318; font-weight: 600; padding: 4px 0; }
.ea-note { color: var(--body-text-color-subdued); font-size: 13px; }
"""


def tags_html(tags: Sequence[tuple[str, float]], heading: str) -> str:
    """The tags as a table of label, bar and probability (3 decimals, as inference.py prints them)."""
    rows = "".join(
        f'<tr><td class="ea-label" title="{html.escape(label)}">{html.escape(label)}</td>'
        f'<td><div class="ea-bar"><span style="width:{100 * min(max(p, 0.0), 1.0):.1f}%"></span></div></td>'
        f'<td class="ea-p">{p:.3f}</td></tr>' for label, p in tags)
    return f'<div class="ea-tags"><div class="ea-head">{html.escape(heading)}</div><table>{rows}</table></div>'


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def summary(result: Analysis, settings: Settings) -> str:
    """One line: what was analysed, how, how long it took, what was found (and a note, if any)."""
    line = (f"<b>{html.escape(result.name)}</b>: {clock(result.duration)} analysed with "
            f"{html.escape(result.model)} in {result.elapsed:.1f} s; {settings.window:g}-s windows every "
            f"{settings.hop:g} s ({settings.mode}); {_plural(len(result.events), 'event')} at threshold "
            f"{settings.threshold:g}")
    note = f'<div class="ea-note">{html.escape(result.note)}</div>' if result.note else ""
    return f'<div class="ea-summary">{line}{note}</div>'


def live_status(shot: Snapshot, model: str, settings: Settings, ended: bool) -> str:
    """One line: listening or stopped, how much was received and tagged, and what was lost on the
    way (beyond the lag of a piece or two) or dropped by a model too slow for the hop."""
    line = (f"<b>{'stopped' if ended else 'listening'}</b>: {clock(shot.seconds)} received, "
            f"{_plural(shot.windows, 'window')} of {settings.window:g} s tagged every {settings.hop:g} s with "
            f"{html.escape(model)}")
    notes = []
    if shot.lost > LOST_NOTED:
        notes.append(f"about {shot.lost:.0f} s of the microphone did not reach the server (a busy machine or "
                     "network): the times run behind the clock")
    if shot.dropped:
        notes.append(f"{shot.dropped:.0f} s dropped: the model cannot keep up with a {settings.hop:g}-s hop "
                     "(a longer hop or a smaller model helps)")
    note = "".join(f'<div class="ea-note">{html.escape(n)}</div>' for n in notes)
    return f'<div class="ea-summary">{line}{note}</div>'


def image_html(png: Optional[bytes], alt: str) -> str:
    """An inline PNG (the live timeline: redrawn every hop, so it is never stored as a file)."""
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<div class="ea-timeline"><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></div>'


def error_line(message: str) -> str:
    """A message as the one line the page shows (its first line; empty: nothing shown)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f'<div class="ea-error">error: {html.escape(first)}</div>' if first else ""
