"""Build an mp3 HDF5 dataset file (the layout `datasets.audioset` reads) from a folder of audio
and a labels CSV.

    python -m datasets.prepare_hdf5 --audio_dir audio/eval --csv eval_segments.csv \
        --output /data/audioset/eval_segments_mp3.hdf
    python -m datasets.prepare_hdf5 --audio_dir my_clips --csv labels.csv --output my_mp3.hdf

Two CSV formats are read (picked automatically, or with --format):

- AudioSet segments CSV (balanced_train_segments.csv etc.): '#' comment lines, then rows
  `YTID, start_seconds, end_seconds, "mid1,mid2,..."`. The audio file of a row is found by its
  name: `Y<YTID>.<ext>`, `<YTID>.<ext>`, or either followed by `_<anything>` (e.g. the segment
  start). Rows without a file, or whose file cannot be read, are skipped with a warning
  (YouTube downloads are never complete). Clips are stored as `Y<YTID>.mp3`.
- simple CSV with a header and the columns `filename,labels`: the path relative to --audio_dir
  and the labels separated by ';' (or by ',' inside a quoted field when no label contains a
  comma); a label is a class display name, a MID or a class index. A missing or unreadable
  file is an error. Clips are stored under their relative path with the extension replaced by
  .mp3.

Classes are the 527 AudioSet classes, or those listed one per line in --classes. Each file is
loaded mono at 32 kHz (soxr resampling), encoded as mp3 (LAME, 128 kbit/s) and stored with its
bit-packed multi-hot target. The output is written to a temp file and renamed when complete; an
interrupted run (Ctrl-C, a kill, a full disk) leaves that file, and the same command continues it.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import io
import logging
import multiprocessing
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

if not __package__:  # run by path (python datasets/prepare_hdf5.py): import from the repository
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402 (after the path fix above)
from tqdm import tqdm  # noqa: E402

from datasets.audio import AudioLoadError, find_audio_files, load_audio  # noqa: E402
from common.files import read_text  # noqa: E402
from datasets.hdf5 import encode_mp3, pack_targets  # noqa: E402
from datasets.hdf5_partial import ResumableMp3Writer  # noqa: E402
from common.errors import InputError, run_cli  # noqa: E402
from common.labels import label_table  # noqa: E402

logger = logging.getLogger(__name__)
SAMPLE_RATE = 32000


@dataclass(frozen=True)
class Clip:
    """One row to write: source file (None when not found), stored name, class indices, and
    where it came from (CSV line) for messages."""
    source: Optional[Path]
    name: str
    labels: tuple[int, ...]
    line: int


def class_lookup(classes_file: Optional[Path]) -> tuple[int, dict[str, int]]:
    """(number of classes, label string -> class index): AudioSet's table (display names, MIDs
    and indices) or the names in `classes_file`, one per line."""
    if classes_file is None:
        table = label_table()
        lookup = {mid: i for i, (mid, _) in enumerate(table)}
        lookup.update({name: i for i, (_, name) in enumerate(table)})
        n = len(table)
    else:
        if not classes_file.is_file():
            raise InputError(f"{classes_file}: classes file not found")
        names = [line.strip() for line in read_text(classes_file).splitlines() if line.strip()]
        if not names or len(set(names)) != len(names):
            raise InputError(f"{classes_file}: needs one unique class name per line")
        lookup = {name: i for i, name in enumerate(names)}
        n = len(names)
    lookup.update({str(i): i for i in range(n)})
    return n, lookup


def detect_format(text: str) -> str:
    """'simple' when the CSV's first line is a header starting with 'filename', else 'segments'."""
    first = text.partition("\n")[0].strip().lower()
    return "simple" if first.replace('"', "").startswith("filename") else "segments"


def _labels(field: str, lookup: dict[str, int], csv_path: Path, line: int) -> tuple[int, ...]:
    field = field.strip()
    if field in lookup:  # one label, possibly a display name with commas
        return (lookup[field],)
    parts = [p.strip() for p in field.split(";" if ";" in field else ",") if p.strip()]
    unknown = [p for p in parts if p not in lookup]
    if unknown:
        raise InputError(f"{csv_path}, line {line}: unknown label {unknown[0]!r}")
    return tuple(sorted({lookup[p] for p in parts}))


def _find_segment_file(ytid: str, stems: dict[str, Path], sorted_stems: list[str]) -> Optional[Path]:
    for key in (f"Y{ytid}", ytid):
        if key in stems:
            return stems[key]
    for prefix in (f"Y{ytid}_", f"{ytid}_"):
        k = bisect.bisect_left(sorted_stems, prefix)
        if k < len(sorted_stems) and sorted_stems[k].startswith(prefix):
            return stems[sorted_stems[k]]
    return None


def read_segments_csv(text: str, csv_path: Path, audio_dir: Path, lookup: dict[str, int]) -> list[Clip]:
    """Clips of an AudioSet segments CSV (`text`, read from `csv_path`), matched to the files of
    `audio_dir`."""
    files = find_audio_files([audio_dir])
    stems = {f.stem: f for f in files}
    sorted_stems = sorted(stems)
    clips = []
    with io.StringIO(text, newline="") as f:
        for line, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4 or not (_is_number(row[1]) and _is_number(row[2])):
                raise InputError(f"{csv_path}, line {line}: expected an AudioSet segments row "
                                 f"'YTID, start_seconds, end_seconds, \"labels\"', got {','.join(row)[:80]!r} "
                                 "(a CSV with a header needs the columns 'filename,labels')")
            ytid = row[0].strip()
            clips.append(Clip(_find_segment_file(ytid, stems, sorted_stems), f"Y{ytid}.mp3",
                              _labels(row[3], lookup, csv_path, line), line))
    return clips


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def read_simple_csv(text: str, csv_path: Path, audio_dir: Path, lookup: dict[str, int]) -> list[Clip]:
    """Clips of a `filename,labels` CSV (`text`, read from `csv_path`); a missing file is an
    InputError."""
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "filename" not in columns or "labels" not in columns:
            raise InputError(f"{csv_path}: expected the columns 'filename,labels', found {','.join(columns)}")
        reader.fieldnames = columns
        clips = []
        for line, row in enumerate(reader, start=2):
            rel = (row["filename"] or "").strip()
            source = audio_dir / rel
            if not rel or not source.is_file():
                raise InputError(f"{csv_path}, line {line}: audio file {source} not found")
            clips.append(Clip(source, str(Path(rel).with_suffix(".mp3").as_posix()),
                              _labels(row["labels"] or "", lookup, csv_path, line), line))
    return clips


def _encode(source: Path) -> bytes | str:
    """mp3 bytes of one file at 32 kHz mono, or the error message."""
    try:
        return encode_mp3(load_audio(source, SAMPLE_RATE), SAMPLE_RATE)
    except AudioLoadError as e:
        return str(e)


def _still_to_write(clips: Sequence[Clip], writer: ResumableMp3Writer, num_classes: int) -> list[Clip]:
    """The clips a taken-over file lacks; when its rows are not all among these clips (another
    CSV, other labels) it is emptied and every clip is written."""
    names, targets = writer.stored()
    done = Counter(zip(names, map(bytes, targets)))
    if sum(done.values()) == 0:
        return list(clips)
    todo = []
    for clip in clips:
        key = (clip.name, bytes(_packed(clip, num_classes)))
        if done[key] > 0:
            done[key] -= 1
        else:
            todo.append(clip)
    if sum(done.values()):
        logger.warning("the interrupted run wrote other clips or labels; starting over")
        writer.restart()
        return list(clips)
    return todo


def _packed(clip: Clip, num_classes: int) -> np.ndarray:
    multi_hot = np.zeros(num_classes, dtype=np.float32)
    multi_hot[list(clip.labels)] = 1.0
    return pack_targets(multi_hot)


def write_dataset(clips: Sequence[Clip], num_classes: int, output: Path, skip_bad: bool,
                  num_workers: int = 1, progress: bool = True) -> tuple[int, int]:
    """Encode and write `clips`; returns (written, skipped). Clips without a source file, and
    unreadable ones when `skip_bad`, are skipped with a warning; otherwise an unreadable file is an
    InputError and no output is left behind. An interruption keeps what was written for the next
    run with the same output to continue (`ResumableMp3Writer`)."""
    present = [c for c in clips if c.source is not None]
    skipped = len(clips) - len(present)
    if skipped:
        logger.warning("%d of %d clips have no audio file in the folder; skipped", skipped, len(clips))
    if not present:
        raise InputError("none of the CSV's clips has an audio file in the folder")
    name_length = max(20, max(len(c.name.encode()) for c in present))
    with ResumableMp3Writer(output, (num_classes + 7) // 8, np.uint8, name_length) as writer:
        todo = _still_to_write(present, writer, num_classes)
        pool = multiprocessing.Pool(num_workers) if num_workers > 1 and todo else None
        try:
            encoded = (pool.imap(_encode, [c.source for c in todo], chunksize=4) if pool
                       else map(_encode, (c.source for c in todo)))
            for clip, mp3 in tqdm(zip(todo, encoded), total=len(todo), desc=output.name, disable=not progress):
                if isinstance(mp3, str):
                    if not skip_bad:
                        raise InputError(mp3)
                    logger.warning("skipped line %d: %s", clip.line, mp3)
                    skipped += 1
                    continue
                writer.append(clip.name, mp3, _packed(clip, num_classes))
        finally:
            if pool is not None:
                pool.terminate()
        if writer.count == 0:
            raise InputError("no clip could be read; nothing written")
        written = writer.count
    return written, skipped


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datasets.prepare_hdf5",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio_dir", required=True, type=Path, help="folder with the audio files")
    parser.add_argument("--csv", required=True, type=Path, help="labels CSV (see above)")
    parser.add_argument("--output", required=True, type=Path, help="HDF5 file to write")
    parser.add_argument("--format", choices=("auto", "segments", "simple"), default="auto")
    parser.add_argument("--classes", type=Path, default=None,
                        help="class names, one per line (default: the 527 AudioSet classes)")
    parser.add_argument("--num_workers", type=int, default=1, help="parallel encoding processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.num_workers < 1:
        raise InputError(f"--num_workers must be at least 1, got {args.num_workers}")
    if not args.audio_dir.is_dir():
        raise InputError(f"{args.audio_dir}: audio folder does not exist")
    if not args.csv.is_file():
        raise InputError(f"{args.csv}: CSV file not found")
    num_classes, lookup = class_lookup(args.classes)
    text = read_text(args.csv)
    fmt = detect_format(text) if args.format == "auto" else args.format
    reader = read_simple_csv if fmt == "simple" else read_segments_csv
    clips = reader(text, args.csv, args.audio_dir, lookup)
    written, skipped = write_dataset(clips, num_classes, args.output, skip_bad=fmt == "segments",
                                     num_workers=args.num_workers)
    print(f"wrote {written} clips ({num_classes} classes) to {args.output}"
          + (f"; skipped {skipped}" if skipped else ""))


if __name__ == "__main__":
    sys.exit(run_cli(main))
