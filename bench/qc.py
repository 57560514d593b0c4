"""Quality control on the CPU: time per frame, false fails on good frames, scan-region IoU.

Simulates good frames (quality 0.95) of every vendor style x view and reads the real
SonoNet example captures, runs ``workers.imaging.qc.assess_instance`` on each and prints:

- QC time per frame (median, p95): simulated single frames with the header's Sequence of
  Ultrasound Regions (as the simulator's DICOM writer and scanners give it) and without
  it (screen captures), the real captures, and cine loops (per loop and per frame);
- the false-fail rate and the warn rate on those good frames, with the checks that fired
  (calipers the simulator burned into the anatomy are a true ``annotation_over_anatomy``
  warning and are counted apart);
- the scan region's IoU with the simulator's ground-truth mask per view and vendor
  (mean, min), with and without the header's region.

    python bench/qc.py [--per-case 10] [--loops 5] [--loop-frames 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _common import ROOT, percentile

from dicom_sr.model import QCOutcome
from workers.imaging.types import DecodedInstance, InstanceQC, UltrasoundRegion


def _rgb(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)


def _instance(
    frames: np.ndarray, regions: tuple[UltrasoundRegion, ...], frame_time_ms: float | None = None
) -> DecodedInstance:
    return DecodedInstance.from_pixels(
        frames, us_regions=regions, frame_time_ms=frame_time_ms, manufacturer="bench"
    )


def _header(bbox: tuple[int, int, int, int]) -> tuple[UltrasoundRegion, ...]:
    c0, r0, c1, r1 = bbox
    return (UltrasoundRegion(c0, r0, c1 - 1, r1 - 1, spatial_format=1, data_type=1),)


def _timed(inst: DecodedInstance) -> tuple[InstanceQC, float]:
    from workers.imaging.qc import assess_instance

    start = time.perf_counter()
    qc = assess_instance(inst)
    return qc, (time.perf_counter() - start) * 1000.0


def _fired(qc: InstanceQC) -> dict[str, QCOutcome]:
    return {c.code: c.outcome for c in qc.checks if c.outcome is not QCOutcome.PASS}


def _ms(label: str, values: list[float], per: str = "frame") -> None:
    print(
        f"  {label:<44} median {statistics.median(values):7.1f} ms/{per}"
        f"   p95 {percentile(values, 95):7.1f}   n={len(values)}"
    )


class _Tally:
    """False fails and warnings over a set of good frames."""

    def __init__(self) -> None:
        self.n = 0
        self.failed = 0
        self.warned = 0
        self.true_warn = 0
        self.codes: Counter[str] = Counter()

    def add(self, qc: InstanceQC, *, calipers: bool = False) -> None:
        fired = _fired(qc)
        if calipers and fired.get("annotation_over_anatomy") is QCOutcome.WARN:
            del fired["annotation_over_anatomy"]
            self.true_warn += 1
        self.n += 1
        self.failed += qc.failed
        self.warned += (not qc.failed) and bool(fired)
        self.codes.update(f"{code}={outcome.value}" for code, outcome in fired.items())

    def line(self, label: str) -> str:
        codes = ", ".join(f"{k} x{v}" for k, v in sorted(self.codes.items())) or "none"
        extra = f"; calipers shown (true warning) {self.true_warn}" if self.true_warn else ""
        return (
            f"  {label:<44} false fail {self.failed}/{self.n} "
            f"({100.0 * self.failed / max(self.n, 1):.1f}%), warn {self.warned}/{self.n} "
            f"({100.0 * self.warned / max(self.n, 1):.1f}%){extra}; fired: {codes}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-case", type=int, default=10, help="frames per view x vendor")
    parser.add_argument("--loops", type=int, default=5, help="cine loops (views in turn)")
    parser.add_argument("--loop-frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import simulator as sim

    rng = np.random.default_rng(args.seed)
    vendors = sorted(sim.VENDOR_STYLES)
    t_header: list[float] = []
    t_image: list[float] = []
    tally_header, tally_image = _Tally(), _Tally()
    iou: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for view in sim.VIEWS:
        for vendor in vendors:
            with_hdr, without = iou.setdefault((view, vendor), ([], []))
            for _ in range(args.per_case):
                frame = sim.simulate_image(view, vendor=vendor, rng=rng, quality=0.95)
                truth = frame.scan_mask
                calipers = bool(frame.acquisition.get("calipers_shown"))
                for regions, times, tally, ious in (
                    (_header(frame.scan_bbox), t_header, tally_header, with_hdr),
                    ((), t_image, tally_image, without),
                ):
                    qc, ms = _timed(_instance(frame.pixels, regions))
                    times.append(ms)
                    tally.add(qc, calipers=calipers)
                    mask = qc.scan_mask
                    ious.append(
                        0.0 if mask is None else float((mask & truth).sum() / (mask | truth).sum())
                    )

    real_dir = Path(os.environ.get("SONONODE_SONONET_DIR", ROOT.parent / "shared" / "sononet"))
    real_files = sorted((real_dir / "example_images").glob("*.tiff"))
    t_real: list[float] = []
    tally_real = _Tally()
    if real_files:
        import tifffile

        for path in real_files:
            rgb = np.asarray(tifffile.imread(path))[..., :3]
            for _ in range(3):  # a few repeats: only five captures
                qc, ms = _timed(_instance(rgb, ()))
                t_real.append(ms)
            tally_real.add(qc)

    t_loop: list[float] = []
    t_loop_frame: list[float] = []
    for i in range(args.loops):
        view = sim.VIEWS[i % len(sim.VIEWS)]
        vendor = vendors[i % len(vendors)]
        loop = sim.simulate_loop(
            view, vendor=vendor, rng=rng, n_frames=args.loop_frames, quality=0.95
        )
        frames = np.stack([_rgb(f.pixels) for f in loop])
        rate = float(loop[0].acquisition.get("frame_rate_hz", 25.0))
        qc, ms = _timed(_instance(frames, _header(loop[0].scan_bbox), 1000.0 / rate))
        t_loop.append(ms)
        t_loop_frame.append(ms / len(loop))

    shape = sim.simulate_image(sim.VIEWS[0], vendor=vendors[0], rng=rng).pixels.shape[:2]
    print(f"QC time on the CPU ({os.cpu_count()} cores visible), frames {shape[0]}x{shape[1]}:")
    _ms("simulated single frames, header region", t_header)
    _ms("simulated single frames, image analysis only", t_image)
    if t_real:
        _ms("real captures 735x975, image analysis only", t_real)
    if t_loop:
        _ms(f"cine loops of {args.loop_frames} frames, header region", t_loop, "loop")
        _ms("  the same, per frame", t_loop_frame)
    print(f"\nGood frames ({args.per_case} per view x vendor, quality 0.95):")
    print(tally_header.line("simulated, header region"))
    print(tally_image.line("simulated, image analysis only"))
    if real_files:
        print(tally_real.line(f"real captures ({len(real_files)})"))
    else:
        print(f"  real captures: none found under {real_dir}")
    print("\nScan region IoU with the simulator's mask (mean / min):")
    print(f"  {'view':<22} {'vendor':<22} {'header region':>16} {'image only':>16}")
    by_view: dict[str, tuple[list[float], list[float]]] = {}
    for (view, vendor), (with_hdr, without) in iou.items():
        agg = by_view.setdefault(view, ([], []))
        agg[0].extend(with_hdr)
        agg[1].extend(without)
        print(
            f"  {view:<22} {vendor:<22} {np.mean(with_hdr):7.3f} / {min(with_hdr):5.3f}"
            f"  {np.mean(without):7.3f} / {min(without):5.3f}"
        )
    for view, (with_hdr, without) in by_view.items():
        print(
            f"  {view:<22} {'(all vendors)':<22} {np.mean(with_hdr):7.3f} / {min(with_hdr):5.3f}"
            f"  {np.mean(without):7.3f} / {min(without):5.3f}"
        )
    every = [v for pair in iou.values() for v in pair[0]]
    below = sum(v < 0.9 for v in every)
    print(f"  header region: {below} of {len(every)} frames below IoU 0.9")
    every = [v for pair in iou.values() for v in pair[1]]
    below = sum(v < 0.9 for v in every)
    print(f"  image only: {below} of {len(every)} frames below IoU 0.9")


if __name__ == "__main__":
    main()
