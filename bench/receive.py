"""Instances per second received durably: sononode's listener vs Orthanc, same run.

Sends one 200-instance simulated study with DCMTK ``dcmsend`` (one association) to the
node (``sononode up``, embedded broker, SQLite) and to an Orthanc on the same machine,
and prints instances/s for each. The node answers Success only after fsync, rename and
index commit; Orthanc's default storage is not fsynced per instance.

    python bench/receive.py [--instances 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import dcmsend, make_orthanc, start_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from simulator import simulate_study

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = []
        for r in range(args.repeat):
            out = tmp / f"study{r}"
            simulate_study(out, seed=1000 + r, vendor="Northwind Medical",
                           n_images=args.instances, n_loops=0)
            studies.append(sorted(out.glob("**/*.dcm")))
        size_mb = sum(f.stat().st_size for f in studies[0]) / 1e6
        print(f"study: {len(studies[0])} instances, {size_mb:.1f} MB "
              f"({size_mb / len(studies[0]) * 1000:.0f} kB each)")

        orthanc = make_orthanc(tmp / "orthanc")
        orthanc.start()
        # Analysis is held back (long stable time) so only receiving is measured.
        node = start_node(tmp / "data", extra_env={"SONONODE_STUDY_STABLE_SECONDS": "3600"})
        results: dict[str, list[float]] = {"sononode": [], "orthanc": []}
        try:
            for files in studies:
                for name, port, aet in (("sononode", node.dicom_port, "SONONODE"),
                                        ("orthanc", orthanc.dicom_port, orthanc.aet)):
                    start = time.perf_counter()
                    dcmsend(port, files, aet=aet)
                    elapsed = time.perf_counter() - start
                    results[name].append(len(files) / elapsed)
        finally:
            node.stop()
            orthanc.stop()
    for name, rates in results.items():
        print(f"{name:9s} instances/s: median {statistics.median(rates):7.1f}  "
              f"runs {', '.join(f'{r:.1f}' for r in rates)}")


if __name__ == "__main__":
    main()
