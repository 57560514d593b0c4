"""Instances per second received: sononode's listener vs bare pynetdicom vs Orthanc, one run.

Sends simulated studies with DCMTK ``dcmsend`` (by path: not the ``storescu`` pynetdicom
installs into the venv, a slow client), one association per study, to three receivers on
this machine, in turn:

- **sononode**: ``sononode up`` (embedded broker, SQLite); Success only after the file is
  fsynced and renamed into the spool and its index row committed.
- **pynetdicom**: the ceiling of any listener built on the library: a bare AE in its own
  process that streams each dataset to a file (``STORE_RECV_CHUNKED_DATASET``) and moves
  it, with no parsing, fsync or index, and no PDU size limit.
- **Orthanc**: its default storage (not fsynced per instance).

For each it prints instances/s (median of ``--repeat`` runs) and the receiving process's
CPU seconds per instance (user + system, from ``/proc``), then the ratios of the same run.

    python bench/receive.py [--instances 200] [--repeat 3] [--loops 0] [--frames 120]
                            [--concurrent 20] [--listener-processes 1]

``--loops N`` sends studies of N cine loops of ``--frames`` frames instead of stills
(``--loops 1 --frames 1100``: one loop of about 1 GB); the node listener's peak resident
memory (``VmHWM``) before and after is printed with the rates.
``--concurrent N`` also sends N studies at once (one association each) to the node and to
bare pynetdicom and prints the aggregate rates, the most associations seen open at once
and the node listener's peak resident memory (``VmHWM``).
``--listener-processes N`` runs the node with ``SONONODE_LISTENER_PROCESSES=N`` (CPU is
summed over its listener processes; the bare receiver stays one process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import make_orthanc, start_node

from harness.peers import Node, dcmtk, get_port, port_open, wait_for


# ----------------------------------------------------------------------------------------
# The bare pynetdicom receiver (run as ``receive.py --bare-listener PORT FOLDER``)
# ----------------------------------------------------------------------------------------
def bare_listener(port: int, folder: Path) -> None:
    """Receive every storage class in every syntax to files; move each; nothing else."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    _config.STORE_RECV_CHUNKED_DATASET = True
    incoming = folder / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming)
    counter = iter(range(1 << 62))

    def store(event: evt.Event) -> int:
        os.replace(event.dataset_path, folder / f"{next(counter)}.dcm")
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.add_supported_context(Verification)
    for cx in StoragePresentationContexts:
        if cx.abstract_syntax:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = int(os.environ.get("BARE_MAX_PDU", "0"))  # 0: unlimited
    ae.maximum_associations = 64
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, store)])


@dataclass
class Receiver:
    name: str
    port: int
    aet: str
    pids: list[int]
    """The receiving processes (several node listeners with --listener-processes)."""
    stop: Callable[[], None]
    rates: list[float] = field(default_factory=list)
    cpu_per_instance: list[float] = field(default_factory=list)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes and their threads (``/proc/PID/stat``)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def start_bare(folder: Path) -> Receiver:
    port = get_port()
    process = subprocess.Popen([sys.executable, __file__, "--bare-listener", str(port),
                                str(folder)])
    wait_for(lambda: port_open(port), timeout=60, what="bare pynetdicom listener")

    def stop() -> None:
        process.terminate()
        process.wait(timeout=10)

    return Receiver("pynetdicom", port, "BARE", [process.pid], stop)


def listener_pids(node: Node, count: int) -> list[int]:
    """The node's ``count`` listener processes (once all have started)."""
    return wait_for(lambda: pids if len(pids := node.role_pids("listener")) == count
                    else None, timeout=60, what=f"{count} listener processes")


def send(receiver: Receiver, files: list[Path], *,
         aet: str = "MODALITY") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [dcmtk("dcmsend"), "-aec", receiver.aet, "-aet", aet, "127.0.0.1", str(receiver.port),
         *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measure(receiver: Receiver, batches: list[list[Path]]) -> tuple[float, float, int]:
    """Send ``batches`` at once (one association each): instances/s, CPU s per instance,
    senders that failed."""
    total = sum(len(files) for files in batches)
    cpu = cpu_seconds(receiver.pids)
    start = time.perf_counter()
    senders = [send(receiver, files, aet=f"MOD{i}") for i, files in enumerate(batches)]
    failed = 0
    for sender in senders:
        _, err = sender.communicate(timeout=3600)
        if sender.returncode != 0:
            failed += 1
            print(f"  {receiver.name}: dcmsend failed: {err.decode()[-300:]}")
    elapsed = time.perf_counter() - start
    return total / elapsed, (cpu_seconds(receiver.pids) - cpu) / total, failed


def simulate(folder: Path, *, seed: int, instances: int, loops: int, frames: int) -> list[Path]:
    from simulator import simulate_study

    simulate_study(folder, seed=seed, vendor="Northwind Medical",
                   n_images=0 if loops else instances, n_loops=loops, frames_per_loop=frames)
    return sorted(folder.glob("**/*.dcm"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loops", type=int, default=0, help="cine loops per study instead")
    parser.add_argument("--frames", type=int, default=120, help="frames per cine loop")
    parser.add_argument("--concurrent", type=int, default=0,
                        help="also send this many studies at once (0: not)")
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--listener-processes", type=int, default=1,
                        help="the node's SONONODE_LISTENER_PROCESSES")
    parser.add_argument("--bare-listener", nargs=2, metavar=("PORT", "FOLDER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_listener:
        bare_listener(int(args.bare_listener[0]), Path(args.bare_listener[1]))
        return

    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); "
          f"node listener processes: {args.listener_processes}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = [simulate(tmp / f"study{r}", seed=1000 + r, instances=args.instances,
                            loops=args.loops, frames=args.frames) for r in range(args.repeat)]
        size_mb = sum(f.stat().st_size for f in studies[0]) / 1e6
        print(f"study: {len(studies[0])} instances, {size_mb:.1f} MB "
              f"({size_mb / len(studies[0]) * 1000:.0f} kB each)")

        receivers: list[Receiver] = []
        # Analysis is held back (long stable time) so only receiving is measured.
        node = start_node(tmp / "data", extra_env={"SONONODE_STUDY_STABLE_SECONDS": "36000",
                                                   "SONONODE_MAX_ASSOCIATIONS_PER_PEER": "64",
                                                   "SONONODE_LISTENER_PROCESSES":
                                                       str(args.listener_processes)})
        receivers.append(Receiver("sononode", node.dicom_port, "SONONODE",
                                  listener_pids(node, args.listener_processes),
                                  node.stop))
        receivers.append(start_bare(tmp / "bare"))
        if not args.no_orthanc:
            orthanc = make_orthanc(tmp / "orthanc")
            orthanc.start()
            assert orthanc.process is not None
            receivers.append(Receiver("orthanc", orthanc.dicom_port, orthanc.aet,
                                      [orthanc.process.pid], orthanc.stop))
        rss_before = _peak_rss_mb(receivers[0].pids)
        try:
            for files in studies:  # interleaved, so that load changes hit all alike
                for receiver in receivers:
                    rate, cpu, _ = measure(receiver, [files])
                    receiver.rates.append(rate)
                    receiver.cpu_per_instance.append(cpu)
                    shutil.rmtree(tmp / "bare", ignore_errors=True)
                    (tmp / "bare" / "incoming").mkdir(parents=True, exist_ok=True)
            rates = {r.name: statistics.median(r.rates) for r in receivers}
            for r in receivers:
                print(f"{r.name:10s} instances/s: median {rates[r.name]:7.1f} (runs "
                      f"{', '.join(f'{x:.1f}' for x in r.rates)}); CPU per instance "
                      f"{statistics.median(r.cpu_per_instance) * 1000:.1f} ms")
            largest = max(f.stat().st_size for files in studies for f in files) / 1e6
            print(f"sononode listener peak RSS {rss_before:.0f} MB before, "
                  f"{_peak_rss_mb(receivers[0].pids):.0f} MB after (largest instance "
                  f"{largest:.1f} MB)")
            print(f"sononode / pynetdicom: {rates['sononode'] / rates['pynetdicom']:.2f}")
            if "orthanc" in rates:
                print(f"sononode / Orthanc:    {rates['sononode'] / rates['orthanc']:.2f}")
            if args.concurrent:
                concurrent(node, receivers[1], tmp, args)
        finally:
            for receiver in receivers:
                receiver.stop()
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def _open_associations(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    return len(out.splitlines())


def _peak_rss_mb(pids: list[int]) -> float:
    """The largest peak resident memory (``VmHWM``) among ``pids``."""
    peaks = [int(line.split()[1]) / 1024 for pid in pids
             for line in Path(f"/proc/{pid}/status").read_text().splitlines()
             if line.startswith("VmHWM:")]
    return max(peaks, default=float("nan"))


def concurrent(node: Node, bare: Receiver, tmp: Path, args: argparse.Namespace) -> None:
    """``--concurrent`` studies sent at once to the node and to bare pynetdicom."""
    batches = [simulate(tmp / f"concurrent{i}", seed=2000 + i, instances=args.instances,
                        loops=args.loops, frames=args.frames) for i in range(args.concurrent)]
    total_mb = sum(f.stat().st_size for files in batches for f in files) / 1e6
    listener = listener_pids(node, args.listener_processes)
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
    node_rate, node_cpu, failed = measure(
        Receiver("sononode", node.dicom_port, "SONONODE", listener, lambda: None), batches)
    done.set()
    sampler.join()
    after = _peak_rss_mb(listener)
    bare_rate, bare_cpu, bare_failed = measure(bare, batches)
    count = sum(len(files) for files in batches)
    print(f"{args.concurrent} concurrent associations, {count} instances ({total_mb:.0f} MB):")
    print(f"  sononode   {node_rate:7.1f} instances/s aggregate, {failed} sender(s) failed, "
          f"CPU per instance {node_cpu * 1000:.1f} ms; at most {peak} associations open at "
          f"once; listener peak RSS {before:.0f} MB before, {after:.0f} MB after")
    print(f"  pynetdicom {bare_rate:7.1f} instances/s aggregate, {bare_failed} sender(s) failed, "
          f"CPU per instance {bare_cpu * 1000:.1f} ms")
    print(f"  sononode / pynetdicom: {node_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
