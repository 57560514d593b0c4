"""Instances per second received durably: sononode's listener vs Orthanc, same run.

Sends one 200-instance simulated study with DCMTK ``dcmsend`` (one association) to the
node (``sononode up``, embedded broker, SQLite) and to an Orthanc on the same machine,
and prints instances/s for each. The node answers Success only after fsync, rename and
index commit; Orthanc's default storage is not fsynced per instance.

    python bench/receive.py [--instances 200] [--repeat 3]

With ``--concurrent N`` it also sends N studies at once (one ``dcmsend`` association each,
``--instances`` instances per study) to the node and prints the aggregate rate, the most
associations seen open at once (established connections to the DICOM port, sampled every
20 ms) and the listener's peak resident memory (its ``VmHWM``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from _common import dcmsend, make_orthanc, start_node

from harness.peers import Node, dcmtk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=0,
                        help="also send this many studies at once (0: not)")
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
    if args.concurrent:
        concurrent(args.concurrent, args.instances)


def _listener_pid(node: Node) -> int:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(node.process.pid)],
                         capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[0]) for line in out.splitlines() if "node.cli listener" in line)


def _open_associations(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return len(out.splitlines())


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def concurrent(senders: int, instances: int) -> None:
    """``senders`` studies sent at once: aggregate rate, peak associations and memory."""
    from simulator import simulate_study

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = []
        for i in range(senders):
            out = tmp / f"study{i}"
            simulate_study(out, seed=2000 + i, vendor="Aurora Imaging", n_images=instances,
                           n_loops=0)
            studies.append(sorted(out.glob("**/*.dcm")))
        total_mb = sum(f.stat().st_size for files in studies for f in files) / 1e6
        # Every sender is on this machine's address: let all of them in (the per-peer limit
        # stands for one modality; here the senders stand for many).
        node = start_node(tmp / "data", extra_env={
            "SONONODE_STUDY_STABLE_SECONDS": "3600",
            "SONONODE_MAX_ASSOCIATIONS_PER_PEER": str(senders)})
        try:
            listener = _listener_pid(node)
            before = _peak_rss_mb(listener)
            peak = 0
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, _open_associations(node.dicom_port))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.perf_counter()
            processes = [subprocess.Popen(
                [dcmtk("dcmsend"), "-aec", "SONONODE", "-aet", f"MOD{i}", "127.0.0.1",
                 str(node.dicom_port), *map(str, files)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for i, files in enumerate(studies)]
            failed = sum(1 for p in processes if p.wait(timeout=1800) != 0)
            elapsed = time.perf_counter() - start
            done.set()
            sampler.join()
            after = _peak_rss_mb(listener)
        finally:
            node.stop()
    print(f"{senders} concurrent associations, {senders * instances} instances "
          f"({total_mb:.0f} MB): {senders * instances / elapsed:.1f} instances/s aggregate, "
          f"{failed} sender(s) failed; at most {peak} associations open at once; listener "
          f"peak RSS {before:.0f} MB before, {after:.0f} MB after")


if __name__ == "__main__":
    main()
