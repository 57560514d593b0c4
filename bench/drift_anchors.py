"""Drift anchors: the figures of ``bench/drift.py`` for open-source drift libraries.

The node's own drift monitor is measured by ``bench/drift.py`` (its figures come from
there, not from this script). This script measures the same three figures, on the same
cached studies and the same resampled streams, for maintained libraries whose licence
allows hospital production use, run at their defaults, so that they can be reported side
by side as anchors:

- Evidently 0.7 (Apache-2.0), ``DataDriftPreset``: per column its default test, chosen
  from the column and the reference size (up to 1,000 reference rows: two-sample K-S for
  numeric columns with more than 5 values, chi-square for labels, Z-test for two-valued
  columns; drift at p < 0.05), and dataset drift when at least half of the columns
  (``drift_share=0.5``) drift. Two verdicts are reported: the preset's dataset drift, and
  "any column" (any per-column test says drift).
- NannyML 0.13 (Apache-2.0), ``UnivariateDriftCalculator`` (Jensen-Shannon distance for
  every column; alert above the mean + 3 SD of the reference chunks' distances) and
  ``DataReconstructionDriftCalculator`` (PCA keeping 65% of the variance, mean and
  most-frequent imputation; alert outside the mean ± 3 SD of the reference chunks'
  reconstruction errors). Chunks are ``--window`` studies (a chunk per period of the
  ``timestamp`` column, one period per window). "NannyML any": either alerts.

Data. The reference of each training vendor is the node's own (the studies the pack's
drift reference was fitted on, cached by :func:`modelkit.drift.collect_reference_studies`
under ``--reference-cache``; their embeddings projected on the pack's axes). The pools are
those ``bench/drift.py`` cached under ``--cache``. Each image is a row: the scalar signals
of :class:`node.drift.signals.ImageSignals` (numbers and flags as numeric columns, labels
as categorical ones) and the embedding's components, with the index of its study.

Tests. The libraries compare windows, not single studies: a stream is cut into consecutive
windows of ``--window`` studies (50 by default), each compared with the vendor's reference;
after each study the stream's status is the verdict of the last complete window (ok before
the first). The streams are drawn exactly as in ``bench/drift.py`` (same generator, seed
and order of draws, so the very same studies), and the figures follow its definitions:

- false-alarm episodes (entries into alert) per 1,000 studies without shift, and the
  share of those windows in alert (a stream that stays in alert has few episodes);
- studies to alarm: ``--warmup`` unshifted studies, then shifted ones until in alert
  (median over replicates, "> N" when not within ``--max-delay``). With windows of 50 the
  delay is a multiple of 50, or 1 when the last warm-up window already alerted
  (how often that happened is printed too);
- cost per study: the computation at a window's end (from the window's table to the
  verdict; the reference fitted beforehand) divided by the window size.

Evidently's streams run its ``DriftedColumnsCount`` metric alone: it is the part of
``DataDriftPreset`` that decides (the same defaults; the script checks that both give the
same count), while the preset also renders a plot per column, about 15 times slower; the
cost of both is printed. NannyML warns when the reference makes few chunks (a reference
of 300 studies per vendor makes 6 chunks of 50): its thresholds come from those values.
Its usage telemetry is turned off (``NML_DISABLE_USAGE_LOGGING``); nothing else is set.

The libraries are not project dependencies: run in a separate virtual environment (pandas
below 3, which Evidently 0.7.23 does not import with; torch first so that pip keeps the
CPU build)::

    python3 -m venv /tmp/anchors-venv
    /tmp/anchors-venv/bin/pip install torch==2.13.0
    /tmp/anchors-venv/bin/pip install -e /work/main evidently==0.7.23 nannyml==0.13.1 \\
        "pandas<3"
    nice -n 10 /tmp/anchors-venv/bin/python bench/drift_anchors.py

A library that does not import is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT
from drift import add_stream_arguments, shifts

from node.drift.reference import POOLED, Projection, Reference
from simulator.vendors import TRAINING_VENDORS

PACK = ROOT / "deploy" / "models" / "sononode-us-sim"
EPOCH = np.datetime64("2024-01-01T00:00")
Verdicts = dict[str, list[bool]]
"""Per anchor column, the alert verdict of each window of a stream."""


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    """The file name part of a pool or vendor (as ``bench/drift.py`` writes it)."""
    return name.replace(" ", "_").replace("+", "p")


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {folder / pattern}, found {len(found)}: run "
                         "bench/drift.py (pools) and fit the pack's drift reference first")
    return found[0]


def _row(values: dict[str, Any], embedding: Sequence[float] | None) -> dict[str, Any]:
    row = {k: v for k, v in values.items() if k != "_embedding"}
    for i, v in enumerate(embedding or ()):
        row[f"emb{i}"] = float(v)
    return row


def reference_studies(path: Path, projection: Projection | None) -> list[list[dict[str, Any]]]:
    """The image rows of one vendor's reference studies, embeddings projected."""
    out = []
    for line in path.read_text().splitlines():
        data = json.loads(line)
        rows = []
        for image, raw in zip(data["images"], data["embeddings"], strict=True):
            embedding = (None if raw is None or projection is None
                         else projection.project(np.asarray(raw, float)))
            rows.append(_row(image, embedding))
        out.append(rows)
    return out


def pool_studies(path: Path) -> list[list[dict[str, Any]]]:
    """The image rows of the studies of a pool of ``bench/drift.py``."""
    return [[_row(image, image.get("_embedding")) for image in json.loads(line)["images"]]
            for line in path.read_text().splitlines()]


@dataclass(frozen=True)
class Columns:
    numeric: list[str]
    categorical: list[str]

    @property
    def all(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def columns_of(studies: Sequence[Sequence[dict[str, Any]]]) -> Columns:
    """The feature columns (in order of appearance): labels are categorical."""
    names: dict[str, bool] = {}
    for rows in studies:
        for row in rows:
            for k, v in row.items():
                if v is not None:
                    names[k] = names.get(k, False) or isinstance(v, str)
    return Columns([k for k, c in names.items() if not c], [k for k, c in names.items() if c])


class Table:
    """The images of a list of studies as one data frame, to build streams from."""

    def __init__(self, pd: Any, studies: Sequence[Sequence[dict[str, Any]]],
                 columns: Columns) -> None:
        self.pd = pd
        self.columns = columns
        frame = pd.DataFrame([r for rows in studies for r in rows])
        frame = frame.reindex(columns=columns.all)
        for name in columns.numeric:
            frame[name] = frame[name].astype(float)
        for name in columns.categorical:
            frame[name] = frame[name].astype(object)
        self.frame = frame
        sizes = np.asarray([len(rows) for rows in studies])
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def stream(self, picks: Sequence[int], window: int, first: int = 0) -> Any:
        """The images of studies ``picks`` with their position (``study``, from ``first``)
        and a ``timestamp`` on the day of their window."""
        picks_ = np.asarray(picks, int)
        rows = np.concatenate([np.arange(self.starts[i], self.starts[i] + self.sizes[i])
                               for i in picks_])
        out = self.frame.iloc[rows].reset_index(drop=True)
        study = np.repeat(np.arange(first, first + len(picks_)), self.sizes[picks_])
        out["study"] = study
        out["timestamp"] = EPOCH + (study // window).astype("timedelta64[D]")
        return out


def concat(pd: Any, frames: Sequence[Any]) -> Any:
    return pd.concat(list(frames), ignore_index=True)


def windows(frame: Any, window: int) -> list[Any]:
    """The consecutive windows of ``window`` studies of a stream (complete ones only)."""
    study = frame["study"].to_numpy()
    count = (int(study.max()) + 1) // window
    bounds = np.searchsorted(study, np.arange(count + 1) * window)
    return [frame.iloc[bounds[w]:bounds[w + 1]] for w in range(count)]


# ----------------------------------------------------------------------------------------
# Anchors
# ----------------------------------------------------------------------------------------
class Anchor:
    """A library run at its defaults: fit on a vendor's reference, verdicts per window."""

    library = ""
    columns: tuple[str, ...] = ()

    def fit(self, reference: Any, columns: Columns) -> None:
        raise NotImplementedError

    def verdicts(self, stream: Any, window: int) -> Verdicts:
        raise NotImplementedError

    def costs(self, window_frame: Any) -> dict[str, float]:
        """Seconds of the computation at a window's end, per cost line."""
        raise NotImplementedError


class EvidentlyAnchor(Anchor):
    library = "evidently"
    columns = ("Evidently dataset", "Evidently any col")

    def __init__(self) -> None:
        self.ev = importlib.import_module("evidently")
        self.presets = importlib.import_module("evidently.presets")
        self.metrics = importlib.import_module("evidently.metrics")
        self.reference: Any = None
        self.definition: Any = None
        self.features: list[str] = []

    def fit(self, reference: Any, columns: Columns) -> None:
        self.features = columns.all
        self.definition = self.ev.DataDefinition(numerical_columns=columns.numeric,
                                                 categorical_columns=columns.categorical)
        self.reference = self.ev.Dataset.from_pandas(reference[self.features],
                                                     data_definition=self.definition)

    def _dataset(self, frame: Any) -> Any:
        return self.ev.Dataset.from_pandas(frame[self.features], data_definition=self.definition)

    def _count(self, frame: Any) -> tuple[float, float]:
        """(drifted columns, their share) by the preset's deciding metric."""
        metric = self.metrics.DriftedColumnsCount()
        value = self.ev.Report([metric]).run(self._dataset(frame), self.reference).dict()
        found = value["metrics"][0]["value"]
        return float(found["count"]), float(found["share"])

    def verdicts(self, stream: Any, window: int) -> Verdicts:
        counts = [self._count(w) for w in windows(stream, window)]
        return {"Evidently dataset": [share >= 0.5 for _, share in counts],
                "Evidently any col": [count > 0 for count, _ in counts]}

    def costs(self, window_frame: Any) -> dict[str, float]:
        started = time.perf_counter()
        count, _ = self._count(window_frame)
        metric = time.perf_counter() - started
        started = time.perf_counter()
        snapshot = self.ev.Report([self.presets.DataDriftPreset()]).run(
            self._dataset(window_frame), self.reference)
        preset = time.perf_counter() - started
        drifted = [m["value"] for m in snapshot.dict()["metrics"]
                   if m["metric_name"].startswith("DriftedColumnsCount")]
        if not drifted or float(drifted[0]["count"]) != count:
            raise SystemExit(f"DataDriftPreset found {drifted} drifted columns, "
                             f"DriftedColumnsCount {count}: the shortcut does not hold")
        return {"Evidently dataset": metric, "Evidently any col": metric,
                "Evidently preset": preset}


class NannyMLAnchor(Anchor):
    library = "nannyml"
    columns = ("NannyML univariate", "NannyML PCA", "NannyML any")

    def __init__(self) -> None:
        os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
        self.nml = importlib.import_module("nannyml")
        self.univariate: Any = None
        self.pca: Any = None

    def fit(self, reference: Any, columns: Columns) -> None:
        common = {"column_names": columns.all, "timestamp_column_name": "timestamp",
                  "chunk_period": "D"}
        self.univariate = self.nml.UnivariateDriftCalculator(**common).fit(reference)
        self.pca = self.nml.DataReconstructionDriftCalculator(**common).fit(reference)

    @staticmethod
    def _alerts(result: Any) -> list[bool]:
        frame = result.filter(period="analysis").to_df()
        alerts = frame[[c for c in frame.columns if c[-1] == "alert"]]
        return [bool(v) for v in alerts.fillna(False).astype(bool).any(axis=1)]

    def verdicts(self, stream: Any, window: int) -> Verdicts:
        complete = (int(stream["study"].max()) + 1) // window * window
        stream = stream[stream["study"] < complete]
        univariate = self._alerts(self.univariate.calculate(stream))
        pca = self._alerts(self.pca.calculate(stream))
        if len(univariate) != complete // window or len(pca) != len(univariate):
            raise SystemExit(f"NannyML made {len(univariate)} and {len(pca)} chunks of a "
                             f"stream of {complete // window} windows")
        return {"NannyML univariate": univariate, "NannyML PCA": pca,
                "NannyML any": [u or p for u, p in zip(univariate, pca, strict=True)]}

    def costs(self, window_frame: Any) -> dict[str, float]:
        started = time.perf_counter()
        self._alerts(self.univariate.calculate(window_frame))
        univariate = time.perf_counter() - started
        started = time.perf_counter()
        self._alerts(self.pca.calculate(window_frame))
        pca = time.perf_counter() - started
        return {"NannyML univariate": univariate, "NannyML PCA": pca,
                "NannyML any": univariate + pca}


def load_anchors(only: Sequence[str]) -> list[Anchor]:
    """The anchors whose library imports (a line for each one skipped)."""
    out: list[Anchor] = []
    factories: list[type[Anchor]] = [EvidentlyAnchor, NannyMLAnchor]
    for factory in factories:
        name = factory.library
        if only and name not in only:
            continue
        try:
            out.append(factory())
        except ImportError as exc:
            print(f"skipped {name}: it does not import here ({exc})")
    return out


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------
def statuses(verdicts: Sequence[bool], window: int, length: int) -> list[bool]:
    """The stream's status after each study: the verdict of the last complete window."""
    out = []
    for i in range(length):
        done = (i + 1) // window
        out.append(bool(verdicts[done - 1]) if done else False)
    return out


def episodes(status: Sequence[bool]) -> int:
    """Number of entries into alert."""
    return sum(1 for i, s in enumerate(status) if s and (i == 0 or not status[i - 1]))


def shown_delay(median: float, limit: int) -> str:
    return f"> {limit}" if median > limit else f"{median:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=PACK)
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "sononode-drift",
                        help="the pools of bench/drift.py")
    parser.add_argument("--reference-cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "drift-cache",
                        help="the reference studies the pack's drift reference was fitted on")
    add_stream_arguments(parser)
    parser.add_argument("--window", type=int, default=50, help="studies per window (chunk)")
    parser.add_argument("--cost-windows", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=[], choices=["evidently", "nannyml"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The resulting number of chunks is too low")

    anchors = load_anchors(args.only)
    if not anchors:
        raise SystemExit("no anchor library imports: see the install lines in the docstring")
    pd = importlib.import_module("pandas")
    for anchor in anchors:
        print(f"{anchor.library} {importlib.metadata.version(anchor.library)}", end="; ")
    print(f"pandas {pd.__version__}, numpy {np.__version__}")

    reference = Reference.from_json(json.loads((args.pack / "drift_reference.json").read_text()))
    # The studies the pack's reference was fitted on: as many per vendor as its groups hold.
    per_vendor = max(g.studies for key, g in reference.groups.items() if key != POOLED)
    ref_studies = {v: reference_studies(_only(args.reference_cache,
                                              f"reference-*-{_slug(v)}-*-{per_vendor}.jsonl"),
                                        reference.projection)
                   for v in TRAINING_VENDORS}
    columns = columns_of([s for studies in ref_studies.values() for s in studies])
    pools = {v: Table(pd, pool_studies(_only(args.cache, f"{_slug(v)}-*-{args.pool_studies}"
                                                          ".jsonl")), columns)
             for v in TRAINING_VENDORS}
    shifted = {name: Table(pd, pool_studies(_only(args.cache, f"{_slug(name)}-*-"
                                                              f"{args.shift_studies}.jsonl")),
                           columns)
               for name in shifts(args.shift_vendor)}
    references = {v: Table(pd, studies, columns).stream(range(len(studies)), args.window)
                  for v, studies in ref_studies.items()}
    print(f"{len(columns.all)} columns per image ({len(columns.numeric)} numeric, "
          f"{len(columns.categorical)} categorical: {', '.join(columns.categorical)}); "
          f"windows of {args.window} studies; references of "
          + ", ".join(f"{len(s)}" for s in ref_studies.values()) + " studies")

    # The streams of bench/drift.py: same generator, seed and order of draws.
    rng = np.random.default_rng(1)
    null_streams = {v: [rng.integers(len(pools[v].sizes), size=args.run_length)
                        for _ in range(args.replicates)] for v in TRAINING_VENDORS}
    base = pools[args.shift_vendor]
    shift_streams = {name: [(rng.integers(len(base.sizes), size=args.warmup),
                             rng.integers(len(pool.sizes), size=args.max_delay))
                            for _ in range(args.replicates)]
                     for name, pool in shifted.items()}

    names = [c for a in anchors for c in a.columns]
    rates: dict[str, dict[str, tuple[float, int]]] = {v: {} for v in TRAINING_VENDORS}
    delays: dict[str, dict[str, list[int]]] = {s: {c: [] for c in names} for s in shifted}
    in_alert: dict[str, list[float]] = {c: [] for c in names}
    alert_after_warmup: dict[str, dict[str, int]] = {s: dict.fromkeys(names, 0) for s in shifted}
    costs: dict[str, list[float]] = {}
    started = time.perf_counter()
    for anchor in anchors:
        for vendor in TRAINING_VENDORS:
            anchor.fit(references[vendor], columns)
            counts: dict[str, list[int]] = {c: [] for c in anchor.columns}
            for picks in null_streams[vendor]:
                found = anchor.verdicts(pools[vendor].stream(picks, args.window), args.window)
                for c, v in found.items():
                    counts[c].append(episodes(statuses(v, args.window, args.run_length)))
                    in_alert[c].append(sum(v) / len(v))
            for c, n in counts.items():
                rates[vendor][c] = (1000 * sum(n) / (args.replicates * args.run_length),
                                    sum(k > 0 for k in n))
            if vendor == args.shift_vendor:
                for w in range(args.cost_windows):
                    frame = windows(pools[vendor].stream(null_streams[vendor][0], args.window),
                                    args.window)[w]
                    for c, seconds in anchor.costs(frame).items():
                        costs.setdefault(c, []).append(1000 * seconds / args.window)
        anchor.fit(references[args.shift_vendor], columns)
        for name, pairs in shift_streams.items():
            for warm, after in pairs:
                stream = concat(pd, [base.stream(warm, args.window),
                                     shifted[name].stream(after, args.window, args.warmup)])
                found = anchor.verdicts(stream, args.window)
                for c, v in found.items():
                    status = statuses(v, args.window, args.warmup + args.max_delay)
                    alert_after_warmup[name][c] += status[args.warmup - 1]
                    delays[name][c].append(next(
                        (i + 1 for i, s in enumerate(status[args.warmup:]) if s),
                        args.max_delay + 1))
        print(f"  {anchor.library}: {time.perf_counter() - started:.0f} s so far", flush=True)

    width = 19
    head = "".join(f"{c:>{width}s}" for c in names)
    print(f"\nfalse-alarm episodes per 1,000 studies without shift ({args.replicates} streams "
          f"of {args.run_length} studies per vendor, from the first study; (n) = streams "
          f"with any):\n{'':28s}{head}")
    for vendor in TRAINING_VENDORS:
        cells = "".join(f"{f'{rates[vendor][c][0]:.2f} ({rates[vendor][c][1]})':>{width}s}"
                        for c in names)
        print(f"  {vendor:26s}{cells}")
    means = "".join(f"{statistics.mean(rates[v][c][0] for v in TRAINING_VENDORS):>{width}.2f}"
                    for c in names)
    print(f"  {'all vendors':26s}{means}")
    shares = "".join(f"{100 * statistics.mean(in_alert[c]):>{width - 1}.1f}%" for c in names)
    print(f"  {'windows in alert, all':26s}{shares}")

    print(f"\nstudies to alarm after {args.warmup} unshifted studies of {args.shift_vendor} "
          f"(median of {args.replicates} replicates, '>' = not within {args.max_delay}; "
          f"(n) = detected):\n{'':28s}{head}")
    for name in shifted:
        cells = ""
        for c in names:
            got = delays[name][c]
            detected = sum(d <= args.max_delay for d in got)
            cell = f"{shown_delay(statistics.median(got), args.max_delay)} ({detected})"
            cells += f"{cell:>{width}s}"
        print(f"  {name:26s}{cells}")
    print(f"  in alert at the warm-up's end (of {args.replicates}; then the delay is 1):")
    for name in shifted:
        cells = "".join(f"{alert_after_warmup[name][c]:>{width}d}" for c in names)
        print(f"  {'  ' + name:26s}{cells}")

    print(f"\ncost per study (ms): the window-end computation / {args.window} studies "
          f"(median of {args.cost_windows} windows, reference fitted beforehand):")
    cells = "".join(f"{statistics.median(costs[c]):>{width}.2f}" for c in names)
    print(f"{'':28s}{head}\n  {'per study':26s}{cells}")
    if "Evidently preset" in costs:
        print(f"  Evidently DataDriftPreset with its rendering: "
              f"{statistics.median(costs['Evidently preset']):.2f} ms per study")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; the node's own figures: "
          "bench/drift.py")


if __name__ == "__main__":
    main()
