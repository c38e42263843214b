"""The command-line vocabulary the scripts share: a flag has one meaning in every script.

- `*_size` flags count samples (`--window_size`, `--hop_size`: the STFT, as in the original's
  scripts), `*_length` flags are seconds (`--clip_length`, `--window_length`, `--hop_length`);
- `--resample_rate` (and inference.py's `--sample_rate`, the original's spelling there) is the
  rate the model runs at; the rate of a raw input stream is `--input_rate`;
- `--cache_path` holds decoded waveforms, `--embedding_cache` the probe's clip embeddings.

The frontend flags are defined once here (`add_frontend_flags`) for the training scripts,
inference.py and complexity.py. A flag renamed for this keeps its old spelling, which warns in one
line and maps to the new name (`OldSpelling`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Optional, Sequence

# flag (argparse dest) -> the models.preprocess.AugmentMelSTFT argument it sets
FRONTEND_FLAGS = {"resample_rate": "sr", "window_size": "win_length", "hop_size": "hopsize", "n_fft": "n_fft",
                  "n_mels": "n_mels", "fmin": "fmin", "fmax": "fmax", "freqm": "freqm", "timem": "timem",
                  "fmin_aug_range": "fmin_aug_range", "fmax_aug_range": "fmax_aug_range"}


class OldSpelling(argparse.Action):
    """An old spelling of a flag: stores its value under the new flag's name (`dest`) after one
    warning line on stderr naming the new flag (`new`, and a `note` on what changed)."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, note: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.note = new, note

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        note = f" ({self.note})" if self.note else ""
        # the argparse convention for a usage warning: one line on stderr while parsing
        print(f"warning: {option_string} is the old spelling of {self.new}{note}: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_old_spelling(parser: argparse.ArgumentParser, old: str, new: str, note: str = "",
                     **kwargs: Any) -> None:
    """`old` as a hidden `OldSpelling` of flag `new` (same type and nargs as given in `kwargs`)."""
    parser.add_argument(old, dest=new.lstrip("-"), action=OldSpelling, new=new, note=note,
                        default=argparse.SUPPRESS, **kwargs)


def add_frontend_flags(parser: argparse.ArgumentParser, training: bool = False,
                       sample_rate: bool = False, bands: bool = True) -> None:
    """The mel frontend's flags (the original's names). Left out, a setting is the model's (its
    registry entry or checkpoint), else the standard one. `training` adds the settings that only
    change training (masking, band-edge jitter); `sample_rate` adds `--sample_rate` as a second
    spelling of `--resample_rate` (the original inference.py's); `bands=False` leaves out the mel
    band edges (--fmin, --fmax), for a command that needs only the spectrogram's shape."""
    g = parser.add_argument_group("preprocessing (the mel frontend; default: the model's settings)")
    rate = ["--resample_rate"] + (["--sample_rate"] if sample_rate else [])
    g.add_argument(*rate, dest="resample_rate", type=int, default=None,
                   help="sample rate the model runs at, in Hz (default: the model's, 32000)")
    g.add_argument("--window_size", type=int, default=None, help="STFT window in samples (default: the model's, 800)")
    g.add_argument("--hop_size", type=int, default=None, help="STFT hop in samples (default: the model's, 320)")
    g.add_argument("--n_fft", type=int, default=None, help="FFT size (default: the model's, 1024)")
    g.add_argument("--n_mels", type=int, default=None, help="mel bands (default: the model's, 128)")
    if bands:
        g.add_argument("--fmin", type=float, default=None, help="lowest mel band edge in Hz (default: the model's, 0)")
        g.add_argument("--fmax", type=float, default=None,
                       help="highest mel band edge in Hz (default: the model's, else sr/2 - fmax_aug_range/2)")
    if training:
        g.add_argument("--freqm", type=int, default=0, help="frequency mask width (training only)")
        g.add_argument("--timem", type=int, default=0, help="time mask width (training only)")
        g.add_argument("--fmin_aug_range", type=int, default=10, help="fmin jitter in Hz (training only)")
        g.add_argument("--fmax_aug_range", type=int, default=2000, help="fmax jitter in Hz (eval fmax without --fmax)")


def frontend_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The AugmentMelSTFT arguments the parsed flag `values` give (those left out: absent)."""
    return {setting: values[flag] for flag, setting in FRONTEND_FLAGS.items() if values.get(flag) is not None}
