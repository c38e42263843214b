"""The web page of demo.py (Gradio): drop, record or stream audio and see its tags and when each sound happens.

Layout: the settings (model, window, hop, threshold, top-k) on top, then two tabs. "Recording": an
upload (any format the loader reads), a microphone recording, or the demo clip in one click; it
shows the clip's tags (#tags), the timeline (#timeline), the events (#events) with the downloads,
and one line for a problem (#error). "Live": the microphone streamed; the latest tags
(#live-tags), the running timeline and the events, every hop.

Each browser has its own `PageSession` (a gr.State): its output folder, its last input, its live
stream; the loaded models are shared (`models.Taggers`). A callback never raises: a problem is one
line on the page, and the server goes on. The page asks nothing of other hosts: system fonts, no
analytics or update check, no share link or share buttons.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from collections import OrderedDict
from typing import Any, Optional, Sequence

import gradio as gr
import numpy as np
import pandas as pd

from common.download import SHIPPED_DIR
from common.errors import AudioLoadError
from datasets.stream import open_stream
from helpers.demo import view
from helpers.demo.analysis import MAX_WINDOW_SECONDS, PageError, Settings, analyse, event_rows
from helpers.demo.live import SOURCE, LiveSession
from helpers.demo.models import Taggers, missing_model, model_choices
from helpers.inference.windows import MODES

logger = logging.getLogger(__name__)

DEMO_CLIP = SHIPPED_DIR / "demo_bells.wav"
EVENT_HEADERS = ["label", "onset (s)", "offset (s)", "probability"]
FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
HINT = ('<div class="ea-note">Drop a file, record one or try the demo clip: its tags, timeline and events '
        'appear here.</div>')
STREAM_EVERY = 0.5  # seconds of microphone audio per piece the browser sends


def _read_piece(path: str) -> tuple[np.ndarray, int]:
    """A recorded piece (a WAV stream from the browser, whose header gives no length) as mono
    samples at its own rate, read as the command reads a WAV stream."""
    blocks: list[np.ndarray] = []
    with open(path, "rb") as f:
        stream = open_stream(f.fileno(), SOURCE)
        with contextlib.suppress(AudioLoadError):  # a piece without samples (the first, at times)
            blocks += stream.blocks(stream.rate)
    return (np.concatenate(blocks) if blocks else np.zeros(0, np.float32)), stream.rate


class Pieces:
    """The pieces one browser uploads while its microphone streams. Gradio names an upload after
    its content, so equal pieces (silence) arrive as one file, perhaps already read: the latest
    `keep` are remembered by name, and the files of older ones are removed (an hour of streaming
    would otherwise leave an hour of audio in Gradio's folder)."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._recent: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()

    def read(self, path: str) -> tuple[np.ndarray, int]:
        """The piece at `path`: mono samples and their rate."""
        if path not in self._recent:
            try:
                self._recent[path] = _read_piece(path)
            except FileNotFoundError:  # removed before its twin was read: a gap, as a dropped hop
                logger.warning("%s: a recorded piece is gone (%s)", SOURCE, path)
                return np.zeros(0, np.float32), 0
            while len(self._recent) > self.keep:
                self._remove(self._recent.popitem(last=False)[0])
        self._recent.move_to_end(path)
        return self._recent[path]

    def close(self) -> None:
        """Remove the files of the pieces remembered."""
        while self._recent:
            self._remove(self._recent.popitem()[0])

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(OSError):
            Path(path).unlink()


class PageSession:
    """One browser's state. Gradio copies a fresh one for each page load, so it starts with plain values."""

    def __init__(self) -> None:
        self.folder: Optional[str] = None  # the downloads of the latest run
        self.last: Optional[tuple[str, str]] = None  # (path, name) of the latest input, for "Analyse again"
        self.live: Optional[LiveSession] = None
        self.live_settings: Optional[Settings] = None
        self.pieces = Pieces()  # the live stream's latest pieces

    def new_folder(self, root: Path) -> Path:
        """An empty folder in `root` for a run's files (the previous run's is removed: Gradio has
        copied what it shows)."""
        self.remove_folder()
        self.folder = tempfile.mkdtemp(prefix="run-", dir=root)
        return Path(self.folder)

    def remove_folder(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def close(self) -> None:
        """The browser has gone: end its stream, remove its files."""
        if self.live is not None:
            self.live.input.end()
        self.pieces.close()
        self.remove_folder()


def _settings(model: str, window: float, hop: float, threshold: float, top_k: float, mode: str = "exact"
              ) -> Settings:
    return Settings(str(model or ""), float(window), float(hop), float(threshold), int(top_k), str(mode))


def _table(rows: list[list]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=EVENT_HEADERS)


class Page:
    """The page for `taggers` (the models given to demo.py in `extra_models` join the picker)."""

    def __init__(self, taggers: Taggers, extra_models: Sequence[str] = (), defaults: Settings = Settings()) -> None:
        self.taggers, self.extra_models, self.defaults = taggers, list(extra_models), defaults
        self.root = Path(tempfile.mkdtemp(prefix="efficientat-page-"))  # every session's files

    def close(self) -> None:
        """Remove every file the page wrote (the server has stopped)."""
        shutil.rmtree(self.root, ignore_errors=True)

    # the Recording tab

    def analyse(self, path: Optional[str], session: Optional[PageSession], model: str, window: float, hop: float,
                threshold: float, top_k: float, mode: str, name: Optional[str] = None,
                progress: gr.Progress = gr.Progress()) -> tuple:
        """error, summary, tags, timeline, events, downloads and the session for the file at `path`."""
        session = session or PageSession()
        if not path:  # the input was cleared
            return "", "", HINT, None, _table([]), None, session
        name = name or Path(path).name
        session.last = (path, name)
        settings = _settings(model, window, hop, threshold, top_k, mode)
        try:
            tagger = self.taggers.get(settings.model)
            result = analyse(tagger, Path(path), name, settings, session.new_folder(self.root),
                             lambda done, what: progress(done, desc=what))
        except (PageError, ValueError, AudioLoadError) as e:
            return view.error_line(str(e)), "", "", None, _table([]), None, session
        except Exception as e:  # noqa: BLE001 (an unforeseen failure is one line too; the server goes on)
            logger.exception("analysis of %s failed", name)
            return view.error_line(f"{name}: {type(e).__name__}: {e}"), "", "", None, _table([]), None, session
        heading = f"{result.model} on {result.name}: the clip's top {len(result.tags)} tags"
        return ("", view.summary(result, settings), view.tags_html(result.tags, heading), str(result.timeline),
                _table(event_rows(result.events)), [str(p) for p in result.downloads], session)

    def analyse_recording(self, path: Optional[str], session: Optional[PageSession], model: str, window: float,
                          hop: float, threshold: float, top_k: float, mode: str,
                          progress: gr.Progress = gr.Progress()) -> tuple:
        """`analyse` for the microphone recording of the Recording tab."""
        if not path:
            return (view.error_line("nothing was recorded (0 s): press Record, then Stop"), "", "", None,
                    _table([]), None, session or PageSession())
        return self.analyse(path, session, model, window, hop, threshold, top_k, mode, "recording.wav", progress)

    def analyse_again(self, session: Optional[PageSession], model: str, window: float, hop: float,
                      threshold: float, top_k: float, mode: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """`analyse` for the latest input, with the settings as they are now."""
        if session is None or session.last is None:
            return (view.error_line("drop a file, record or pick the example first"), "", "", None, _table([]),
                    None, session or PageSession())
        path, name = session.last
        return self.analyse(path, session, model, window, hop, threshold, top_k, mode, name, progress)

    def model_note(self, model: str) -> str:
        """The one line for a model that is not there (empty otherwise)."""
        return view.error_line(missing_model(model) or "")

    def refresh_models(self) -> Any:
        """The picker's choices as they are now (a model downloaded meanwhile joins them)."""
        return gr.Dropdown(choices=model_choices(self.extra_models))

    # the Live tab

    def live_piece(self, path: Optional[str], session: Optional[PageSession], model: str, window: float,
                   hop: float, threshold: float, top_k: float) -> tuple:
        """live error, status, tags, timeline, events and the session, after one recorded piece."""
        session = session or PageSession()
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), session
        try:
            samples, rate = session.pieces.read(path)
            if not rate:  # a piece gone missing: nothing to feed
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), session
            if session.live is None or session.live.finished:
                session.live_settings = _settings(model, window, hop, threshold, top_k)
                session.live = LiveSession(self.taggers.get(session.live_settings.model), session.live_settings,
                                           rate)
            session.live.feed(samples)
        except (PageError, ValueError, AudioLoadError) as e:
            return view.error_line(str(e)), gr.skip(), gr.skip(), gr.skip(), gr.skip(), session
        return self._live_view(session, ended=False)

    def live_stop(self, session: Optional[PageSession]) -> tuple:
        """The end of a recording: the last windows, every event closed, the event files."""
        session = session or PageSession()
        if session.live is None or session.live.finished:
            return (view.error_line("nothing was recorded (0 s): press Record, wait a few seconds, then Stop"),
                    gr.skip(), gr.skip(), gr.skip(), gr.skip(), session, gr.skip())
        session.live.finish()
        session.pieces.close()
        shown = self._live_view(session, ended=True)
        return (*shown, [str(p) for p in session.live.downloads(session.new_folder(self.root))])

    def _live_view(self, session: PageSession, ended: bool) -> tuple:
        live, settings = session.live, session.live_settings
        shot = live.snapshot(settings.top_k)
        error = view.error_line(live.error or "")
        status = view.live_status(shot, live.model, settings, ended)
        if not shot.tags:
            return error, status, gr.skip(), gr.skip(), gr.skip(), session
        start = (shot.windows - 1) * settings.hop
        tags = view.tags_html(shot.tags, f"the latest window ({start:g} to {start + settings.window:g} s)")
        timeline = view.image_html(shot.timeline, "live timeline") if shot.timeline is not None else gr.skip()
        return error, status, tags, timeline, _table(shot.events), session

    # layout

    def build(self) -> gr.Blocks:
        """The page (see the module doc)."""
        with gr.Blocks(title="EfficientAT: what sounds, and when", analytics_enabled=False) as blocks:
            session = gr.State(PageSession, delete_callback=PageSession.close)
            gr.Markdown("## EfficientAT: what sounds are in a recording, and when\n"
                        "Tags the 527 AudioSet classes with a model running on this machine; nothing leaves it.",
                        elem_id="title")
            controls = self._controls()
            # the Live tab is shown first and the Recording tab once the page has loaded: Gradio 6.31's
            # streamed microphone sends 0.1-s pieces, and loses those sent while one is on its way, when
            # it first appears in a tab that is not the one shown; shown at once, it sends STREAM_EVERY
            with gr.Tabs(selected="live") as tabs:
                with gr.Tab("Recording", id="recording", elem_id="tab-recording"):
                    self._recording_tab(session, controls)
                with gr.Tab("Live", id="live", elem_id="tab-live"):
                    self._live_tab(session, controls)
            blocks.load(lambda: gr.Tabs(selected="recording"), None, tabs, show_progress="hidden")
            blocks.load(self.refresh_models, None, controls[0], show_progress="hidden")
        return blocks

    def _controls(self) -> list[Any]:
        d = self.defaults
        with gr.Row(elem_id="settings", equal_height=True):
            model = gr.Dropdown(model_choices(self.extra_models), value=d.model, label="model", allow_custom_value=True,
                                elem_id="model", scale=2, info="shipped or cached; others say how to get them")
            window = gr.Slider(0.5, MAX_WINDOW_SECONDS, d.window, step=0.5, label="window (s)", elem_id="window")
            hop = gr.Slider(0.25, 10.0, d.hop, step=0.25, label="hop (s)", elem_id="hop")
            threshold = gr.Slider(0.0, 1.0, d.threshold, step=0.05, label="threshold", elem_id="threshold")
            top_k = gr.Slider(1, 20, d.top_k, step=1, label="tags shown", elem_id="top-k")
        return [model, window, hop, threshold, top_k]

    def _recording_tab(self, session: gr.State, controls: list[Any]) -> None:
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                upload = gr.File(label="drop an audio file (wav, flac, ogg, mp3, m4a, ...)", elem_id="upload",
                                 type="filepath", height=140)
                record = gr.Audio(sources=["microphone"], type="filepath", label="or record one", elem_id="record",
                                  buttons=[])
                gr.Examples([[str(DEMO_CLIP), 2.0, 1.0]], [upload, controls[1], controls[2]], label="or try",
                            example_labels=["the demo clip (bells, 6 s)"], elem_id="example")
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=self.defaults.mode, label="windows", elem_id="mode", scale=3,
                                    info="shared: one pass over the recording, ~4x faster where the model allows")
                    again = gr.Button("analyse again", elem_id="again", scale=1, min_width=100, size="md")
            with gr.Column(scale=3, min_width=400):
                error = gr.HTML(elem_id="error")
                summary = gr.HTML(elem_id="summary")
                tags = gr.HTML(HINT, elem_id="tags", min_height=60)
        timeline = gr.Image(label="timeline: the top classes over time, events outlined", show_label=False,
                            elem_id="timeline", type="filepath", interactive=False, buttons=["download", "fullscreen"],
                            format="png")
        with gr.Row():
            events = gr.Dataframe(_table([]), label="events", elem_id="events", interactive=False, max_height=360,
                                  scale=3, buttons=["copy"])
            downloads = gr.File(label="downloads: events (.csv, .json), clip embedding (.npy), timeline",
                                elem_id="downloads", file_count="multiple", interactive=False, scale=2, height=270)
        settings = [*controls, mode]
        outputs = [error, summary, tags, timeline, events, downloads, session]
        shown = {"concurrency_id": "analysis", "show_progress_on": [tags, timeline]}
        upload.change(self.analyse, [upload, session, *settings], outputs, concurrency_limit=2, **shown)
        record.stop_recording(self.analyse_recording, [record, session, *settings], outputs, **shown)
        again.click(self.analyse_again, [session, *settings], outputs, **shown)
        controls[0].change(self.model_note, controls[0], error, show_progress="hidden")

    def _live_tab(self, session: gr.State, controls: list[Any]) -> None:
        gr.Markdown("Record from the microphone: the tags of the latest window and the timeline of the last "
                    "two minutes change every hop, and events appear as they start and end (the live path of "
                    "`windowed_inference.py --mic`).")
        mic = gr.Audio(sources=["microphone"], streaming=True, type="filepath", label="microphone",
                       elem_id="live-mic", buttons=[])
        error = gr.HTML(elem_id="live-error")
        status = gr.HTML(elem_id="live-status")
        with gr.Row():
            tags = gr.HTML(elem_id="live-tags", min_height=60)
            events = gr.Dataframe(_table([]), label="events", elem_id="live-events", interactive=False,
                                  max_height=300)
        timeline = gr.HTML(elem_id="live-timeline")
        downloads = gr.File(label="events of the recording (.csv, .json), when it stops", elem_id="live-downloads",
                            file_count="multiple", interactive=False, height=110)
        outputs = [error, status, tags, timeline, events, session]
        mic.stream(self.live_piece, [mic, session, *controls], outputs, stream_every=STREAM_EVERY,
                   concurrency_limit=4, show_progress="hidden")
        mic.stop_recording(self.live_stop, session, [*outputs, downloads], show_progress="hidden")


THEME_FONTS = {"font": FONTS, "font_mono": MONO_FONTS}


def serve(page: Page, port: int, max_upload_mb: float, block: bool = True) -> gr.Blocks:
    """Serve the page on 127.0.0.1:`port` (uploads over `max_upload_mb` are refused before they are
    sent); returns the running Blocks (`close()` stops it) unless `block`, which serves until Ctrl-C."""
    blocks = page.build()
    blocks.queue(default_concurrency_limit=2)
    blocks.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, quiet=True,
                  prevent_thread_lock=True, footer_links=[], run_history=False, max_file_size=f"{max_upload_mb:g}mb",
                  ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False, allowed_paths=[str(DEMO_CLIP)],
                  theme=gr.themes.Default(primary_hue="blue", neutral_hue="slate", **THEME_FONTS), css=view.CSS)
    if block:
        blocks.block_thread()
    return blocks
