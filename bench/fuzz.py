"""Fuzz the node's parsers with mutated headers and bytes, in-process, and count failures.

Every input goes through what a received instance meets, in order: the listener's checks
(bounded inflation, pydicom header parse, identity validation, completeness check), then,
if the listener would accept it, the worker's decoding and QC and the report's evidence
header. A failure is an exception that escapes one of these (each must answer with a
status or a recorded reason instead). Prints inputs per second and every distinct failure.

    python bench/fuzz.py --inputs 100000 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from dicom_sr.builder import _evidence_header
from harness.poison import POISONS
from node.handlers import check_complete
from node.index import InstanceMeta, InvalidInstance
from node.receive import InflationLimitExceeded, inflated_size
from simulator import simulate_study
from workers.imaging.pixels import PixelDataError, load_instance
from workers.imaging.qc import assess_instance

_VRS = ("US", "SS", "UL", "LO", "SH", "CS", "DS", "IS", "UI", "OB", "OW", "PN", "DA", "TM",
        "FL", "FD", "AT", "SQ", "UN")
_PROTECTED = {0x00080016, 0x00080018}


def mutate(path: Path, out: Path, rnd: random.Random) -> None:
    """Header edits (most inputs) or raw byte flips (some) of a valid file."""
    if rnd.random() < 0.2:
        data = bytearray(path.read_bytes())
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(132, min(len(data), 4096))] = rnd.randrange(256)
        out.write_bytes(bytes(data))
        return
    ds: Dataset = dcmread(path)
    if rnd.random() < 0.1:
        ds = POISONS[rnd.choice(sorted(POISONS))](ds)
    tags = [t for t in ds.keys()  # noqa: SIM118 (a Dataset iterates elements)
            if t.group not in (0x0002, 0x7FE0) and t not in _PROTECTED]
    for _ in range(rnd.randint(1, 4)):
        tag = BaseTag(rnd.choice(tags))
        kind = rnd.random()
        vr = rnd.choice(_VRS) if kind < 0.3 else ds[tag].VR
        if vr == "SQ":
            vr = "UN"
        value = bytes(rnd.randrange(256) for _ in range(rnd.choice((0, 1, 2, 4, 8, 16, 64))))
        if len(value) % 2:
            value += b" "
        ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(out, enforce_file_format=False)


def one(path: Path) -> str:
    """Run an input through the parsers; the stage it ended in."""
    inflated_size(path, 64 * 1024 * 1024)
    ds = dcmread(path, stop_before_pixels=True)
    meta = InstanceMeta.from_dataset(ds, "1.2.840.10008.1.2.1")
    check_complete(path)
    try:
        decoded = load_instance(path, max_frames=4)
    except PixelDataError:
        return "not decodable"
    assess_instance(decoded)
    _evidence_header(ds)
    return "analysed" if meta else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Malformed input makes pydicom and the node warn on nearly every file.
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    rnd = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="sononode-fuzz-"))
    simulate_study(root / "valid", seed=args.seed, vendor="Northwind Medical", n_images=2,
                   n_loops=1, frames_per_loop=4, size=(120, 160))
    valid = sorted((root / "valid").glob("*.dcm"))
    outcomes: collections.Counter[str] = collections.Counter()
    failures: dict[str, str] = {}
    started = time.perf_counter()
    target = root / "input.dcm"
    for i in range(args.inputs):
        try:
            mutate(rnd.choice(valid), target, rnd)
        except Exception:
            outcomes["unwritable (skipped)"] += 1
            continue
        try:
            outcomes[one(target)] += 1
        except (InvalidInstance, InflationLimitExceeded):
            outcomes["refused by the listener"] += 1
        except Exception as exc:
            # What the listener's handler catches as "cannot understand": parse errors of
            # the header or the completeness check. Anything later is a failure.
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{type(exc).__name__} at {Path(frames[-1].filename).name}:" \
                    f"{frames[-1].lineno}"
            names = [f.name for f in frames]
            stage = names[names.index("one") + 1] if "one" in names[:-1] else names[-1]
            if stage in ("inflated_size", "dcmread", "from_dataset", "check_complete"):
                outcomes["refused by the listener"] += 1
            else:
                outcomes["FAILURE"] += 1
                failures.setdefault(where, f"input {i}: {exc!r}"[:200])
        if (i + 1) % 10000 == 0:
            print(f"{i + 1} inputs, {dict(outcomes)}", flush=True)
    seconds = time.perf_counter() - started
    print(f"\n{args.inputs} inputs in {seconds:.0f} s ({args.inputs / seconds:.0f}/s)")
    for outcome, count in outcomes.most_common():
        print(f"  {outcome:28s} {count}")
    print(f"distinct failures: {len(failures)}")
    for where, example in failures.items():
        print(f"  {where}: {example}")


if __name__ == "__main__":
    main()
