"""Seconds from study completion to the SR accepted by the PACS, measured from outside.

Starts Orthanc and ``sononode up`` (embedded broker, SQLite, CPU, the production scheduler
interval), sends N simulated studies one after another with DCMTK ``dcmsend`` and, for
each, takes the moment the study became stable (the node's own record of the last
instance's arrival plus ``SONONODE_STUDY_STABLE_SECONDS``) and the moment the SR is in
Orthanc (polled every 25 ms, which adds 12 ms on average; Orthanc stores an instance
before it answers Success, so this is no earlier than the PACS's Success). The node's own
timestamps split the interval into the scheduling wait (stable moment to job created),
each stage, the export (SR written to the PACS's Success: the hop to the export task, the
association and the PACS storing the SR) and the rest (the hops between the stages, and
this script's polling).

    python bench/latency.py [--studies 20] [--images 4] [--loops 1] [--frames 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import dcmsend, epoch_seconds, make_orthanc, percentile, start_node, wait_for
from pydicom import dcmread

STABLE_SECONDS = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--loops", type=int, default=1)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--scheduler-interval", type=float, default=1.0,
                        help="SONONODE_SCHEDULER_INTERVAL_SECONDS (the production default)")
    args = parser.parse_args()

    from simulator import VENDOR_STYLES, simulate_study

    vendors = sorted(VENDOR_STYLES)
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        orthanc = make_orthanc(tmp / "orthanc")
        orthanc.start()
        node = start_node(tmp / "data", destinations=orthanc.destination, extra_env={
            "SONONODE_STUDY_STABLE_SECONDS": str(STABLE_SECONDS),
            "SONONODE_SCHEDULER_INTERVAL_SECONDS": str(args.scheduler_interval)})
        try:
            for i in range(args.studies):
                out = tmp / f"s{i}"
                simulate_study(out, seed=2000 + i, vendor=vendors[i % len(vendors)],
                               n_images=args.images, n_loops=args.loops,
                               frames_per_loop=args.frames)
                files = sorted(out.glob("**/*.dcm"))
                study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                dcmsend(node.dicom_port, files)

                def in_orthanc(uid: str = study_uid) -> list[dict[str, Any]] | None:
                    return orthanc.find_instances(uid, "SR") or None

                wait_for(in_orthanc, timeout=300, interval=0.025,
                         what=f"SR of study {i} in Orthanc")
                in_pacs = time.time()

                def exported(uid: str = study_uid) -> dict[str, Any] | None:
                    study = node.get(f"/studies/{uid}")
                    job = study["jobs"][-1] if study["jobs"] else None
                    if job and job["exports"] and job["exports"][0]["state"] == "sent":
                        return dict(study)
                    return None

                study = wait_for(exported, timeout=60, interval=0.05, what="export recorded")
                job = study["jobs"][-1]
                stable = epoch_seconds(study["last_received_at"]) + STABLE_SECONDS
                row = {"total": in_pacs - stable,
                       "scheduling": epoch_seconds(job["created_at"]) - stable,
                       **(job["stage_seconds"] or {})}
                export = job["exports"][0]
                # From the SR written to the PACS's Success: the hop to the export task, the
                # association and the PACS storing the SR.
                row["export"] = epoch_seconds(export["sent_at"]) - epoch_seconds(
                    export["created_at"])
                row["other"] = row["total"] - sum(v for k, v in row.items() if k != "total")
                rows.append(row)
                print(f"study {i:2d} ({vendors[i % len(vendors)]}): {row['total']:.2f} s  "
                      + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "total"))
        finally:
            node.stop()
            orthanc.stop()
    totals = [r["total"] for r in rows]
    print(f"\n{len(rows)} studies of {args.images} images + {args.loops} loop(s) of "
          f"{args.frames} frames; stable moment -> SR in the PACS (scheduler interval "
          f"{args.scheduler_interval:g} s):")
    print(f"  median {statistics.median(totals):.2f} s   p95 {percentile(totals, 95):.2f} s"
          f"   max {max(totals):.2f} s")
    for part in rows[0]:
        if part != "total":
            values = [r.get(part, 0.0) for r in rows]
            print(f"  {part:10s} median {statistics.median(values):.3f} s   "
                  f"p95 {percentile(values, 95):.3f} s")


if __name__ == "__main__":
    main()
