"""Drift monitoring figures: false alarms without shift, studies to alarm under shifts, cost.

Studies are simulated and sent through the node's own QC and analysis with the pack
(:func:`modelkit.drift.site_study_signals`), with seeds that never overlap the ones the
pack's drift reference was fitted on. They form pools, cached under ``--cache``:

- per training vendor, ``--pool-studies`` studies without shift;
- for one vendor (``--shift-vendor``), ``--shift-studies`` studies under each shift: its
  scanner switched to the held-out vendor's image style, gain +3 dB and +8 dB, a coarser
  probe, the malignant nodule prevalence doubled.

Streams are then drawn from the pools (studies resampled with replacement) and run through
the node's own test (:func:`node.drift.monitor.step`):

- false-alarm episodes per 1,000 studies without shift, from a stream's first study on
  (``--replicates`` streams of ``--run-length`` studies per vendor);
- studies needed to alarm: ``--warmup`` studies without shift, then shifted studies until
  the stream is in alert (median over replicates; "> N" when not within ``--max-delay``);
- cost per study of :func:`node.drift.observe` on SQLite, with a short and a long history.

Run: ``python bench/drift.py --cache /tmp/sononode-drift`` (``docs/DRIFT.md``'s figures: add
``--pool-studies 450 --shift-studies 400 --replicates 60``; the pools take a while on
the first run; later runs reuse them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import ROOT

from modelkit.drift import (
    BENCH_SEED,
    DOUBLED_MALIGNANT,
    SiteCondition,
    site_studies,
)
from node.db import Database
from node.drift.monitor import Status, observe, step
from node.drift.reference import Reference
from node.drift.signals import ImageSignals, StudySignals
from node.drift.vendors import scanner_of
from simulator.vendors import HELD_OUT_VENDOR, TRAINING_VENDORS, acquisition_change
from workers.models.inference import Analyser
from workers.models.packs import ModelPack

PACK = ROOT / "deploy" / "models" / "sononode-us-sim"
Pool = list[list[ImageSignals]]


def shifts(vendor: str) -> dict[str, SiteCondition]:
    """The shifted conditions of ``vendor``'s scanner."""
    return {
        "held-out vendor style": SiteCondition(vendor=vendor, image_style=HELD_OUT_VENDOR),
        "gain +3 dB": SiteCondition(vendor=vendor,
                                    image_style=acquisition_change(vendor, "gain+3")),
        "gain +8 dB": SiteCondition(vendor=vendor,
                                    image_style=acquisition_change(vendor, "gain+8")),
        "coarser probe": SiteCondition(vendor=vendor,
                                       image_style=acquisition_change(vendor, "coarse-probe")),
        "malignant prevalence x2": SiteCondition(vendor=vendor, nodule_weights=DOUBLED_MALIGNANT),
    }


def pool(analyser: Analyser, cache: Path, name: str, condition: SiteCondition,
         seeds: Sequence[int]) -> tuple[Pool, StudySignals]:
    """The image signals of the studies of ``condition`` (cached as JSON lines)."""
    path = cache / f"{name.replace(' ', '_').replace('+', 'p')}-{seeds[0]}-{len(seeds)}.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        rows = []
        started = time.perf_counter()
        for _, signals in site_studies(analyser, condition, seeds):
            study = signals[0][1]
            rows.append({"manufacturer": study.manufacturer, "model_name": study.model_name,
                         "model": study.model, "heads": list(study.heads),
                         "images": [im.to_json() for im in study.images]})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"  pool {name}: {len(rows)} studies in {time.perf_counter() - started:.0f} s",
              flush=True)
    first = rows[0]
    template = StudySignals(manufacturer=first["manufacturer"], model_name=first["model_name"],
                            model=first["model"], heads=tuple(first["heads"]))
    return [[ImageSignals.from_json(im) for im in r["images"]] for r in rows], template


def run(reference: Reference, template: StudySignals, studies: Sequence[list[ImageSignals]],
        ) -> list[str]:
    """The stream's status after each study."""
    scanner = scanner_of(template.manufacturer, template.model_name)
    match = reference.group_for(scanner.vendor, scanner.scanner)
    assert match is not None
    state: dict[str, object] = {}
    out = []
    for images in studies:
        result = step(match.group, state, images)
        state = result.state
        out.append(Status.ALERT if result.reasons else Status.OK)
    return out


def episodes(statuses: Sequence[str]) -> int:
    """Number of entries into alert."""
    return sum(1 for i, s in enumerate(statuses)
               if s == Status.ALERT and (i == 0 or statuses[i - 1] != Status.ALERT))


def cost(reference: Reference, template: StudySignals, studies: Pool, *,
         history: int) -> float:
    """Milliseconds per :func:`observe` on SQLite after ``history`` earlier studies."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{tmp}/index.db")
        db.create_schema()
        rng = np.random.default_rng(0)
        timings = []
        for i in range(history + 50):
            images = studies[int(rng.integers(len(studies)))]
            study = StudySignals(manufacturer=template.manufacturer,
                                 model_name=template.model_name, model=template.model,
                                 heads=template.heads, images=tuple(images))
            started = time.perf_counter()
            with db.session() as session:
                observe(session, study, reference, study_instance_uid=f"2.25.{i}")
            if i >= history:
                timings.append(time.perf_counter() - started)
        db.engine.dispose()
        return 1000 * statistics.median(timings)


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The pools and streams' options (shared with ``bench/drift_anchors.py``)."""
    parser.add_argument("--pool-studies", type=int, default=150)
    parser.add_argument("--shift-studies", type=int, default=80)
    parser.add_argument("--shift-vendor", default=TRAINING_VENDORS[0])
    parser.add_argument("--replicates", type=int, default=20)
    parser.add_argument("--run-length", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max-delay", type=int, default=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=PACK)
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "sononode-drift")
    add_stream_arguments(parser)
    parser.add_argument("--history", type=int, default=5000,
                        help="studies already observed for the long-history cost")
    args = parser.parse_args()

    pack = ModelPack.load(args.pack, device="cpu")
    if pack.drift is None:
        sys.exit(f"{args.pack} has no drift reference: run 'sononode model drift-reference'")
    reference = pack.drift
    analyser = Analyser([pack])
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"pack {pack.name} {pack.manifest.version}; reference: {reference.description}")

    pools: dict[str, tuple[Pool, StudySignals]] = {}
    for v, vendor in enumerate(TRAINING_VENDORS):
        seeds = [BENCH_SEED + v * 100_000 + i for i in range(args.pool_studies)]
        pools[vendor] = pool(analyser, args.cache, vendor, SiteCondition(vendor=vendor), seeds)
    shifted: dict[str, Pool] = {}
    for s, (name, condition) in enumerate(shifts(args.shift_vendor).items()):
        seeds = [BENCH_SEED + 900_000 + s * 10_000 + i for i in range(args.shift_studies)]
        shifted[name] = pool(analyser, args.cache, name, condition, seeds)[0]

    rng = np.random.default_rng(1)
    print(f"\nfalse alarms without shift ({args.replicates} streams of {args.run_length} "
          "studies per vendor, from the first study):")
    all_rates = []
    for vendor, (studies, template) in pools.items():
        counts = []
        for _ in range(args.replicates):
            stream = [studies[int(i)] for i in rng.integers(len(studies), size=args.run_length)]
            counts.append(episodes(run(reference, template, stream)))
        rate = 1000 * sum(counts) / (args.replicates * args.run_length)
        all_rates.append(rate)
        print(f"  {vendor:24s} {rate:5.2f} episodes per 1,000 studies "
              f"(streams with any: {sum(c > 0 for c in counts)}/{args.replicates})")
    print(f"  all vendors              {statistics.mean(all_rates):5.2f} per 1,000 studies "
          f"(target {reference.false_alarms * 1000 / 1000:.2f} per stream)")

    base, template = pools[args.shift_vendor]
    print(f"\nstudies to alarm after {args.warmup} unshifted studies of {args.shift_vendor} "
          f"({args.replicates} replicates, '>' = not within {args.max_delay}):")
    for name, studies in shifted.items():
        delays = []
        for _ in range(args.replicates):
            warm = [base[int(i)] for i in rng.integers(len(base), size=args.warmup)]
            after = [studies[int(i)] for i in rng.integers(len(studies), size=args.max_delay)]
            statuses = run(reference, template, warm + after)[args.warmup:]
            delays.append(next((i + 1 for i, s in enumerate(statuses) if s == Status.ALERT),
                               args.max_delay + 1))
        median = statistics.median(delays)
        shown = f"> {args.max_delay}" if median > args.max_delay else f"{median:.0f}"
        detected = sum(d <= args.max_delay for d in delays)
        print(f"  {name:26s} median {shown:>6s} studies  "
              f"(detected {detected}/{args.replicates}, range {min(delays)}-{max(delays)})")

    short = cost(reference, template, base, history=0)
    long = cost(reference, template, base, history=args.history)
    print(f"\ncost of observe() per study on SQLite: {short:.1f} ms with no history, "
          f"{long:.1f} ms after {args.history} studies (ratio {long / short:.2f})")


if __name__ == "__main__":
    main()
