"""Simulated studies on disk: DICOM instances of one patient plus a ``labels.csv``."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.dicom import (
    deterministic_uid,
    new_study_context,
    resolve_transfer_syntax,
    write_instance,
)
from simulator.simulate import SimFrame, simulate_image, simulate_loop
from simulator.vendors import VendorStyle, get_vendor
from simulator.views import THYROID_VIEWS, VIEWS, NoduleClass

logger = logging.getLogger(__name__)

LABEL_COLUMNS = (
    "file",
    "sop_instance_uid",
    "study_instance_uid",
    "vendor",
    "view",
    "nodule",
    "lung_pattern",
    "quality",
    "frames",
)
"""Columns of ``labels.csv``."""


@dataclass(frozen=True)
class InstanceLabel:
    """Ground truth of one written instance (one row of ``labels.csv``)."""

    file: Path
    sop_instance_uid: str
    study_instance_uid: str
    vendor: str
    view: str
    nodule: str | None
    lung_pattern: str | None
    quality: float
    frames: int

    def row(self, root: Path) -> dict[str, str]:
        """CSV row with the file relative to ``root`` and ``None`` as an empty cell."""
        values = {
            "file": self.file.relative_to(root).as_posix(),
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "vendor": self.vendor,
            "view": self.view,
            "nodule": self.nodule or "",
            "lung_pattern": self.lung_pattern or "",
            "quality": f"{self.quality:.4f}",
            "frames": str(self.frames),
        }
        return values


@dataclass(frozen=True)
class SimulatedStudy:
    """A study written by :func:`simulate_study`."""

    out_dir: Path
    study_instance_uid: str
    patient_id: str
    vendor: str
    files: tuple[Path, ...]
    labels: tuple[InstanceLabel, ...]
    labels_csv: Path


def simulate_study(
    out_dir: Path,
    *,
    seed: int,
    vendor: str,
    n_images: int = 6,
    n_loops: int = 0,
    frames_per_loop: int = 24,
    views: Sequence[str] | None = None,
    size: tuple[int, int] | None = (480, 640),
    transfer_syntax: str | None = None,
    photometric: str | None = None,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
    image_style: str | VendorStyle | None = None,
    nodule_weights: Sequence[float] | None = None,
) -> SimulatedStudy:
    """Simulate one patient's study and write it as DICOM files plus ``labels.csv``.

    Still images form series 1 (``IMG_0001.dcm``...); each cine loop is its own series
    (``CINE_0001.dcm``...). All instances share the StudyInstanceUID and patient.

    Parameters
    ----------
    out_dir
        Folder to write into (created).
    seed
        Seed of everything (same seed, same files and UIDs).
    vendor
        Vendor style of the scanner.
    n_images, n_loops, frames_per_loop
        Numbers of single-frame images, cine loops and frames per loop.
    views
        Views to draw from (default: all); drawn at random per instance.
    size
        Frame ``(rows, cols)``; ``None`` uses the vendor's native screen matrix.
    transfer_syntax
        Name or UID (see :data:`~simulator.dicom.TRANSFER_SYNTAXES`).
    photometric
        ``MONOCHROME2``, ``RGB`` or ``YBR_FULL_422``; ``None`` follows the vendor.
    patient_id, study_instance_uid
        Override the drawn identifiers.
    image_style
        Vendor style the images are formed with, when it differs from ``vendor`` (whose
        name, model and station the headers carry): a scanner whose software update changed
        its image processing, a new probe, a gain change. ``None``: ``vendor``'s own style.
    nodule_weights
        Probabilities of ``none``, ``benign`` and ``malignant`` for thyroid views (a
        population with another prevalence); ``None``: the simulator's usual mix.

    Returns
    -------
    SimulatedStudy
        Paths and labels of what was written.

    Raises
    ------
    ValueError
        For negative counts, unknown views, vendor or transfer syntax.
    """
    style = get_vendor(vendor)
    formed = get_vendor(image_style) if image_style is not None else style
    if nodule_weights is not None:
        weights = np.asarray(nodule_weights, dtype=float)
        if weights.shape != (len(NoduleClass),) or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(
                f"nodule_weights must be {len(NoduleClass)} non-negative numbers "
                f"({', '.join(n.value for n in NoduleClass)}), got {nodule_weights!r}"
            )
        nodule_p = weights / weights.sum()
    if n_images < 0 or n_loops < 0 or frames_per_loop < 1:
        raise ValueError(
            f"need n_images >= 0, n_loops >= 0 and frames_per_loop >= 1, got "
            f"{n_images}, {n_loops}, {frames_per_loop}"
        )
    view_list = tuple(views) if views is not None else VIEWS
    bad = [v for v in view_list if v not in VIEWS]
    if bad or not view_list:
        raise ValueError(f"unknown or no views {bad!r}; expected some of {VIEWS}")
    resolve_transfer_syntax(transfer_syntax)
    frame_size = size if size is not None else formed.native_size
    rng = np.random.default_rng(seed)
    study = new_study_context(
        rng, vendor=vendor, patient_id=patient_id, study_instance_uid=study_instance_uid
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    uid_key = study.study_instance_uid

    def uid(*parts: object) -> str:
        return deterministic_uid(uid_key, *parts)

    jobs: list[tuple[str, int, list[SimFrame]]] = []
    def nodule(view: str) -> str | None:
        if nodule_weights is None or view not in THYROID_VIEWS:
            return None
        return str(rng.choice([n.value for n in NoduleClass], p=nodule_p))

    for i in range(n_images):
        view = str(rng.choice(view_list))
        frame = simulate_image(
            view, vendor=formed, rng=rng, size=frame_size, nodule=nodule(view)
        )
        jobs.append((f"IMG_{i + 1:04d}.dcm", 1, [frame]))
    for i in range(n_loops):
        view = str(rng.choice(view_list))
        loop = simulate_loop(
            view, vendor=formed, rng=rng, n_frames=frames_per_loop, size=frame_size,
            nodule=nodule(view),
        )
        jobs.append((f"CINE_{i + 1:04d}.dcm", 2 + i, loop))

    files: list[Path] = []
    labels: list[InstanceLabel] = []
    for k, (name, series_no, frames) in enumerate(jobs):
        path = out / name
        sop = uid("sop", k)
        write_instance(
            frames,
            path,
            vendor=vendor,
            study=study,
            series_instance_uid=uid("series", series_no),
            series_number=series_no,
            instance_number=k + 1 if series_no == 1 else 1,
            sop_instance_uid=sop,
            transfer_syntax=transfer_syntax,
            photometric=photometric,
        )
        lab = frames[0].labels
        files.append(path)
        labels.append(
            InstanceLabel(
                file=path,
                sop_instance_uid=sop,
                study_instance_uid=study.study_instance_uid,
                vendor=vendor,
                view=str(lab["view"]),
                nodule=None if lab["nodule"] is None else str(lab["nodule"]),
                lung_pattern=None if lab["lung_pattern"] is None else str(lab["lung_pattern"]),
                quality=float(lab["quality"] or 0.0),
                frames=len(frames),
            )
        )
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        for lab_ in labels:
            writer.writerow(lab_.row(out))
    logger.info("wrote study %s: %d instances in %s", study.study_instance_uid, len(files), out)
    return SimulatedStudy(
        out_dir=out,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        vendor=vendor,
        files=tuple(files),
        labels=tuple(labels),
        labels_csv=csv_path,
    )
