"""Seconds from study completion to the SR accepted by the PACS (median and p95).

Starts Orthanc and ``sononode up`` (embedded broker, SQLite, CPU), sends N simulated
studies one after another with ``dcmsend``, and for each reads from the node's API the
moment the study was found complete (job created) and the moment the PACS answered
Success to the SR's C-STORE (export sent).

    python bench/latency.py [--studies 20] [--images 4] [--loops 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import dcmsend, make_orthanc, percentile, start_node, wait_for
from pydicom import dcmread


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text.removesuffix("Z"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--loops", type=int, default=1)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()

    from simulator import VENDOR_STYLES, simulate_study

    vendors = sorted(VENDOR_STYLES)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        orthanc = make_orthanc(tmp / "orthanc")
        orthanc.start()
        node = start_node(tmp / "data", destinations=orthanc.destination,
                          extra_env={"SONONODE_STUDY_STABLE_SECONDS": "2"})
        latencies: list[float] = []
        stages: dict[str, list[float]] = {}
        try:
            for i in range(args.studies):
                out = tmp / f"s{i}"
                simulate_study(out, seed=2000 + i, vendor=vendors[i % len(vendors)],
                               n_images=args.images, n_loops=args.loops,
                               frames_per_loop=args.frames)
                files = sorted(out.glob("**/*.dcm"))
                study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                dcmsend(node.dicom_port, files)

                def sent(uid: str = study_uid) -> dict[str, Any] | None:
                    study = node.get(f"/studies/{uid}")
                    job = study["jobs"][-1] if study["jobs"] else None
                    if job and job["exports"] and job["exports"][0]["state"] == "sent":
                        return job
                    return None

                job = wait_for(sent, timeout=300, interval=0.1, what=f"SR of study {i}")
                latency = (_t(job["exports"][0]["sent_at"]) - _t(job["created_at"])).total_seconds()
                latencies.append(latency)
                for stage, seconds in (job["stage_seconds"] or {}).items():
                    stages.setdefault(stage, []).append(seconds)
                print(f"study {i:2d} ({vendors[i % len(vendors)]}): {latency:.2f} s")
        finally:
            node.stop()
            orthanc.stop()
    print(f"\n{len(latencies)} studies of {args.images} images + {args.loops} loop(s) of "
          f"{args.frames} frames; completion -> SR accepted by the PACS:")
    print(f"  median {statistics.median(latencies):.2f} s   p95 {percentile(latencies, 95):.2f} s"
          f"   max {max(latencies):.2f} s")
    for stage, values in stages.items():
        print(f"  stage {stage:10s} median {statistics.median(values):.2f} s")


if __name__ == "__main__":
    main()
