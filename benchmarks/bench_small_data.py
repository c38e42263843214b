"""The small-data recipes on real recordings: `ex_custom.py --recipe probe | probe_finetune |
finetune` on the UrbanSound8K subset (../shared/data/urbansound8k_subset: 120 clips, 10 classes).

Split. Neighbouring UrbanSound8K clips are overlapping 4-s slices of one recording, so a random
split would test on near-copies of training clips. Every class is cut into two halves that share
no recording time: whole recordings (largest first) go to the half below its share; a class with a
single recording is cut at the time that balances the halves best, the clips crossing the cut are
dropped. Fold k tests on half k; the other half is cut again the same way into train (2/3) and val
(1/3, early stopping / best epoch). The `probe` row is the recipe as a user runs it (C by CV on
train, head refitted on train + val); the `probe (train+val)` row gives it all labelled clips of
the half as training clips. Without val rows the script takes the test half as its validation
split: its score is that of the head fitted on the training clips (the validation line, printed
before the refit, which then also sees the test half: ignore that checkpoint). `logreg (train+val)` is the reference the probe must match: scikit-learn's
logistic regression (C = 1) on standardized pooled embeddings (`embeddings.py`'s, whole files).

Each run is a fresh `python ex_custom.py` process (embedding cache emptied first); each line
ends with the script's summary (what was chosen), the table gives test accuracy per fold, the
mean, and wall / CPU seconds per run (the machine may be shared: CPU seconds are the steadier
figure). `bench_probe_variants.py` compares probe features and window settings faster, from
features exported once.

    python benchmarks/bench_small_data.py                        # all recipes, both folds
    python benchmarks/bench_small_data.py --recipes probe --folds 0
"""
from __future__ import annotations

import argparse
import csv
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "urbansound8k_subset"
ROWS = ("logreg (train+val)", "probe (train+val)", "probe", "probe_finetune", "finetune")


def two_parts(rows: list[dict], members: list[int], first_share: float = 0.5) -> tuple[list[int], list[int]]:
    """Split clip indices into two parts per class that share no recording time (see above)."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in members:
        by_class[rows[i]["class"]].append(i)
    part: dict[int, int] = {}
    for clips in by_class.values():
        recordings: dict[str, list[int]] = defaultdict(list)
        for i in clips:
            recordings[rows[i]["fsID"]].append(i)
        if len(recordings) == 1:
            start, end = (lambda i: float(rows[i]["start"])), (lambda i: float(rows[i]["end"]))

            def score(t: float) -> tuple:
                first, second = sum(end(i) <= t for i in clips), sum(start(i) >= t for i in clips)
                return min(first, second) > 0, -abs(first - first_share * (first + second)), first + second, t

            cut = max(score(t) for t in {start(i) for i in clips} | {end(i) for i in clips})[3]
            part.update((i, 0 if end(i) <= cut else 1 if start(i) >= cut else -1) for i in clips)
        else:
            sizes = [0, 0]
            for rec in sorted(recordings, key=lambda r: (-len(recordings[r]), r)):
                side = 0 if sizes[0] < first_share * (sum(sizes) + len(recordings[rec])) else 1
                part.update((i, side) for i in recordings[rec])
                sizes[side] += len(recordings[rec])
    return [i for i in members if part[i] == 0], [i for i in members if part[i] == 1]


def write_fold_csv(rows: list[dict], fold: int, path: Path, merge_val: bool) -> None:
    halves = two_parts(rows, list(range(len(rows))))
    test, pool = halves[fold], halves[1 - fold]
    val, train = two_parts(rows, pool, 1 / 3)
    split = {**{i: "test" for i in test}, **{i: "train" if merge_val else "val" for i in val},
             **{i: "train" for i in train}}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label", "split"])
        writer.writerows([rows[i]["file"], rows[i]["class"], split[i]] for i in sorted(split))


def logreg_baseline(table: Path, data: Path, model: str) -> tuple[float, float, float]:
    """(test accuracy, wall s, CPU s) of plain logistic regression on standardized pooled embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from helpers.inference.embeddings import embed_files
    from helpers.inference.resolve import resolve_model

    started, cpu_started = time.perf_counter(), time.process_time()
    rows = list(csv.DictReader(open(table)))
    _, features, errors = embed_files(resolve_model(model), [data / r["filename"] for r in rows])
    if errors:
        sys.exit(f"could not embed: {next(iter(errors.values()))}")
    train = [r["split"] == "train" for r in rows]
    labels = [r["label"] for r in rows]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    clf.fit(features[train], [lab for lab, t in zip(labels, train) if t])
    test = [not t for t in train]
    accuracy = float((clf.predict(features[test]) == [lab for lab, t in zip(labels, test) if t]).mean())
    return accuracy, time.perf_counter() - started, time.process_time() - cpu_started


def run(command: list[str]) -> tuple[str, float, float]:
    """(stdout, wall seconds, CPU seconds of the child) of one script run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the subset's folder (with subset.csv)")
    parser.add_argument("--model", default="mn04_as")
    parser.add_argument("--recipes", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--extra", default="", help="more ex_custom.py options, e.g. '--probe_features embedding'")
    parser.add_argument("--finetune_epochs", type=int, default=20,
                        help="epochs of the original's recipe (its schedule shortened: warm-up 2, "
                             "ramp-down from epoch 5 over the rest)")
    args = parser.parse_args()
    rows = list(csv.DictReader(open(args.data / "subset.csv")))
    recipes = args.recipes.split(",")
    results: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for fold in args.folds:
            for name in recipes:
                recipe = name.split(" ")[0]
                table = Path(tmp) / f"fold{fold}_{recipe}.csv"
                write_fold_csv(rows, fold, table, merge_val=name.endswith("(train+val)"))
                if recipe == "logreg":
                    accuracy, wall, cpu = logreg_baseline(table, args.data, args.model)
                    results[name].append((accuracy, wall, cpu))
                    print(f"fold {fold} {name}: test accuracy {accuracy:.3f}, {wall:.0f} s wall, {cpu:.0f} s CPU",
                          flush=True)
                    continue
                shutil.rmtree(Path(tmp) / "embeddings", ignore_errors=True)
                command = [sys.executable, "ex_custom.py", "--pretrained_name", args.model,
                           "--dataset_dir", str(args.data), "--csv", str(table), "--clip_length", "4",
                           "--recipe", recipe, "--logger", "none", "--num_workers", "0", "--overwrite",
                           "--out_dir", str(Path(tmp) / "run"), "--cache_dir", str(Path(tmp) / "embeddings"),
                           *args.extra.split()]
                if recipe == "finetune":
                    command += ["--n_epochs", str(args.finetune_epochs), "--warm_up_len", "2",
                                "--ramp_down_start", "5", "--ramp_down_len", str(max(1, args.finetune_epochs - 7))]
                out, wall, cpu = run(command)
                # without val rows the test half is the script's validation split
                accuracy = float(re.findall(r"^(?:test|validation) \(.*accuracy ([0-9.]+)", out, re.M)[-1])
                results[name].append((accuracy, wall, cpu))
                chosen = re.findall(r"^recipe .*", out, re.M)  # the script's summary: what was chosen
                print(f"fold {fold} {name}: test accuracy {accuracy:.3f}, {wall:.0f} s wall, {cpu:.0f} s CPU"
                      + (f"; {chosen[-1]}" if chosen else ""), flush=True)
    print("\n| recipe | " + " | ".join(f"fold {f}" for f in args.folds) + " | mean | wall s | CPU s |")
    print("|---|" + "---|" * (len(args.folds) + 3))
    for name in recipes:
        accs, walls, cpus = zip(*results[name])
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} | "
              + "/".join(f"{w:.0f}" for w in walls) + " | " + "/".join(f"{c:.0f}" for c in cpus) + " |")


if __name__ == "__main__":
    main()
