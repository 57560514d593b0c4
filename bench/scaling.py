"""Studies analysed per minute with 1 worker process against 2, in one run.

For each worker count, starts Orthanc and ``sononode up`` (embedded broker, SQLite, CPU)
with ``SONONODE_WORKER_CONCURRENCY`` set to it, sends N simulated studies with DCMTK
``dcmsend`` (one association each, all at once), and measures from the moment the first
study became stable (its last instance's arrival plus the stable time: work can start) to
the moment every SR is in Orthanc. The worker counts alternate over ``--repeat`` rounds,
so that a change in the machine's load hits both alike; it prints studies per minute and
the ratio.

    python bench/scaling.py [--studies 12] [--repeat 2] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import epoch_seconds, make_orthanc, start_node, wait_for
from pydicom import dcmread

from harness.peers import dcmtk

STABLE_SECONDS = 2.0


def run(studies: list[list[Path]], workers: int, tmp: Path) -> float:
    """Seconds from the first stable moment to the last SR in Orthanc."""
    orthanc = make_orthanc(tmp / f"orthanc-{workers}-{time.monotonic_ns()}")
    orthanc.start()
    node = start_node(tmp / f"data-{workers}-{time.monotonic_ns()}",
                      destinations=orthanc.destination,
                      extra_env={"SONONODE_STUDY_STABLE_SECONDS": str(STABLE_SECONDS),
                                 "SONONODE_WORKER_CONCURRENCY": str(workers),
                                 "SONONODE_MAX_ASSOCIATIONS_PER_PEER": str(len(studies))})
    try:
        uids = [str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                for files in studies]
        senders = [subprocess.Popen([dcmtk("dcmsend"), "-aec", "SONONODE", "-aet", f"MOD{i}",
                                     "127.0.0.1", str(node.dicom_port), *map(str, files)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i, files in enumerate(studies)]
        assert all(s.wait(timeout=600) == 0 for s in senders), "a dcmsend failed"

        def all_in_pacs() -> bool | None:
            return all(orthanc.find_instances(uid, "SR") for uid in uids) or None

        wait_for(all_in_pacs, timeout=1800, interval=0.1, what="every SR in Orthanc")
        done = time.time()
        stable = min(epoch_seconds(node.get(f"/studies/{uid}")["last_received_at"])
                     for uid in uids)
        return done - (stable + STABLE_SECONDS)
    finally:
        node.stop()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from simulator import VENDOR_STYLES, simulate_study

    vendors = sorted(VENDOR_STYLES)
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = []
        for i in range(args.studies):
            out = tmp / f"study{i}"
            simulate_study(out, seed=6000 + i, vendor=vendors[i % len(vendors)], n_images=4,
                           n_loops=1, frames_per_loop=16)
            studies.append(sorted(out.glob("**/*.dcm")))
        for _ in range(args.repeat):
            for workers in args.workers:
                elapsed = run(studies, workers, tmp)
                seconds[workers].append(elapsed)
                print(f"{workers} worker process(es): {args.studies} studies in {elapsed:.1f} s "
                      f"from the first stable moment")
    rates = {w: args.studies / statistics.median(s) * 60 for w, s in seconds.items()}
    for workers, rate in rates.items():
        print(f"{workers} worker process(es): {rate:.1f} studies/min (median of "
              f"{len(seconds[workers])})")
    base = rates[args.workers[0]]
    for workers in args.workers[1:]:
        print(f"{workers} against {args.workers[0]}: {rates[workers] / base:.2f} x")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
