"""``sononode simulate``: write simulated ultrasound studies as DICOM folders."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simulator.dicom import TRANSFER_SYNTAXES, resolve_transfer_syntax
from simulator.study import simulate_study
from simulator.vendors import VENDOR_STYLES
from simulator.views import VIEWS

logger = logging.getLogger(__name__)


def _size(text: str) -> tuple[int, int] | None:
    if text.lower() == "native":
        return None
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must be ROWSxCOLS or 'native', got {text!r}"
        ) from None
    return rows, cols


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``simulate`` command."""
    p = argparse.ArgumentParser(
        prog="sononode simulate",
        description="Write simulated ultrasound studies (DICOM + labels.csv).",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--vendor",
        choices=sorted(VENDOR_STYLES),
        default=None,
        help="vendor style (default: drawn per study)",
    )
    p.add_argument("--images", type=int, default=6, help="still images per study")
    p.add_argument("--loops", type=int, default=0, help="cine loops per study")
    p.add_argument("--frames", type=int, default=24, help="frames per cine loop")
    p.add_argument(
        "--transfer-syntax",
        default=None,
        help=f"UID or one of {', '.join(TRANSFER_SYNTAXES)} (default explicit)",
    )
    p.add_argument(
        "--photometric",
        default=None,
        choices=["MONOCHROME2", "RGB", "YBR_FULL_422"],
        help="photometric interpretation (default: follows the vendor)",
    )
    p.add_argument("--studies", type=int, default=1, help="number of studies (subfolders)")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=None, help="views to draw from")
    p.add_argument(
        "--size",
        type=_size,
        default=(480, 640),
        help="frame ROWSxCOLS or 'native' (default 480x640)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_transfer_syntax(args.transfer_syntax)
    except ValueError as exc:
        parser.error(str(exc))
    if args.studies < 1 or args.images < 0 or args.loops < 0 or args.frames < 1:
        parser.error("--studies and --frames must be >= 1, --images and --loops >= 0")
    rng = np.random.default_rng(args.seed)
    vendors = sorted(VENDOR_STYLES)
    out: Path = args.out
    for i in range(args.studies):
        vendor = args.vendor or str(rng.choice(vendors))
        folder = out if args.studies == 1 else out / f"study_{i + 1:03d}"
        try:
            study = simulate_study(
                folder,
                seed=args.seed + i,
                vendor=vendor,
                n_images=args.images,
                n_loops=args.loops,
                frames_per_loop=args.frames,
                views=args.views,
                size=args.size,
                transfer_syntax=args.transfer_syntax,
                photometric=args.photometric,
            )
        except ValueError as exc:
            logger.exception("simulation failed")
            print(f"error: {exc}")
            return 2
        print(
            f"study {study.study_instance_uid} ({vendor}, patient {study.patient_id}): "
            f"{len(study.files)} files in {folder}"
        )
        for lab in study.labels:
            print(
                f"  {lab.file.name}  {lab.view:<21} nodule={lab.nodule or '-':<9} "
                f"lung={lab.lung_pattern or '-':<13} quality={lab.quality:.2f} "
                f"frames={lab.frames}"
            )
        print(f"  labels: {study.labels_csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
