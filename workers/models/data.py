"""Labelled frame sets for training and evaluation (simulated or read from DICOM files).

A :class:`FrameSet` holds grey frames already cropped to the scan region and resized to the
network input, as ``uint8`` (compact: a few thousand frames are tens of MB), with per-task
integer labels (``-1`` where a task does not apply), the vendor and the study each frame
comes from. Splits are always by study, never by frame.
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from workers.models.nets import CLASSIFICATION_HEADS, LUNG_LABELS, NODULE_LABELS, VIEW_LABELS

logger = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
THYROID_VIEWS = ("thyroid_transverse", "thyroid_longitudinal")


@dataclass
class FrameSet:
    """Frames ``(N, H, W)`` uint8 and their labels.

    ``labels[task]`` is ``(N,)`` int64 class indices (``-1``: not applicable / unknown);
    ``quality`` is ``(N,)`` float32 in ``[0, 1]`` (NaN: unknown).
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    quality: torch.Tensor
    vendor: list[str]
    study: torch.Tensor

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 3 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be (N, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        for name, value in self.labels.items():
            if value.shape != (n,):
                raise ValueError(
                    f"labels[{name!r}] must have shape ({n},), got {tuple(value.shape)}"
                )
        if self.quality.shape != (n,) or self.study.shape != (n,) or len(self.vendor) != n:
            raise ValueError("quality, study and vendor must have one entry per frame")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray | torch.Tensor | Sequence[int]) -> FrameSet:
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return FrameSet(
            images=self.images[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            quality=self.quality[idx],
            vendor=[self.vendor[i] for i in idx.tolist()],
            study=self.study[idx],
        )

    def vendors(self) -> list[str]:
        return sorted(set(self.vendor))

    def by_vendor(self, vendor: str) -> FrameSet:
        return self.subset([i for i, v in enumerate(self.vendor) if v == vendor])

    def unit_float(self) -> torch.Tensor:
        """``(N, 1, H, W)`` float32 in ``[0, 1]``."""
        return self.images.float().div_(255.0).unsqueeze(1)

    @staticmethod
    def concat(sets: Sequence[FrameSet]) -> FrameSet:
        offset = 0
        studies = []
        for s in sets:
            studies.append(s.study + offset)
            offset += int(s.study.max().item()) + 1 if len(s) else 0
        return FrameSet(
            images=torch.cat([s.images for s in sets]),
            labels={k: torch.cat([s.labels[k] for s in sets]) for k in sets[0].labels},
            quality=torch.cat([s.quality for s in sets]),
            vendor=[v for s in sets for v in s.vendor],
            study=torch.cat(studies),
        )


def split_by_study(frames: FrameSet, fractions: Sequence[float], *, seed: int) -> list[FrameSet]:
    """Split into parts of about ``fractions`` of the studies each (no study in two parts)."""
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f <= 0 for f in fractions):
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    studies = np.unique(frames.study.numpy())
    rng = np.random.default_rng(seed)
    rng.shuffle(studies)
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(studies)).astype(int)
    study_np = frames.study.numpy()
    parts = []
    for a, b in itertools.pairwise(bounds):
        chosen = np.isin(study_np, studies[a:b])
        parts.append(frames.subset(np.nonzero(chosen)[0]))
    return parts


def resize_grey(grey: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Float grey ``(H, W)`` in [0, 1] -> ``(h, w)`` uint8 tensor (bilinear, antialiased)."""
    t = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return (t[0, 0].clamp(0, 1) * 255.0).round().to(torch.uint8)


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 grey or RGB pixels -> float32 grey in [0, 1]."""
    array = np.asarray(pixels)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float32) @ _LUMA
    return array.astype(np.float32) / (255.0 if np.asarray(pixels).dtype == np.uint8 else 1.0)


def crop_bbox(grey: np.ndarray, bbox: Sequence[int] | None) -> np.ndarray:
    """Crop ``(column0, row0, column1, row1)`` (exclusive end); whole image when None."""
    if bbox is None:
        return grey
    c0, r0, c1, r1 = (int(v) for v in bbox)
    crop = grey[max(0, r0) : r1, max(0, c0) : c1]
    return crop if min(crop.shape) >= 8 else grey


# ----------------------------------------------------------------------------------------
# Simulated data
# ----------------------------------------------------------------------------------------
def simulator_available() -> bool:
    """True when :mod:`workers.simulator` imports and offers ``simulate_image``."""
    try:
        import workers.simulator as sim
    except ImportError:
        return False
    return hasattr(sim, "simulate_image")


def _label_index(labels: Sequence[str], value: object) -> int:
    return labels.index(str(value)) if value is not None and str(value) in labels else -1


#: Native frame sizes (rows, cols) drawn for simulated images, with their probabilities: the
#: network sees several scanner resolutions before resizing.
SIM_SIZES: tuple[tuple[int, int], ...] = ((240, 320), (360, 480), (480, 640))
SIM_SIZE_WEIGHTS: tuple[float, ...] = (0.5, 0.3, 0.2)
#: Probability of each view (order of ``VIEW_LABELS``): thyroid views are drawn more often
#: because the nodule task sees only them and is the hardest.
SIM_VIEW_WEIGHTS: tuple[float, ...] = (0.15, 0.25, 0.25, 0.15, 0.2)


@dataclass(frozen=True)
class _StudyJob:
    seed: int
    study: int
    vendor: str
    images: int
    input_size: tuple[int, int]
    sizes: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    view_weights: tuple[float, ...]


def _simulate_study(job: _StudyJob) -> list[tuple[np.ndarray, int, int, int, float, str]]:
    """Frames of one simulated study: (uint8 image, view, nodule, lung, quality, vendor)."""
    from workers.simulator import simulate_image

    # One generator per study: the data do not depend on the number of worker processes.
    rng = np.random.default_rng([job.seed, job.study])
    out = []
    for _ in range(job.images):
        view = VIEW_LABELS[int(rng.choice(len(VIEW_LABELS), p=np.asarray(job.view_weights)))]
        nodule = NODULE_LABELS[int(rng.integers(3))] if view in THYROID_VIEWS else None
        pattern = LUNG_LABELS[int(rng.integers(3))] if view == "lung" else None
        size = job.sizes[int(rng.choice(len(job.sizes), p=np.asarray(job.weights)))]
        frame = simulate_image(
            view, vendor=job.vendor, rng=rng, size=size, nodule=nodule, lung_pattern=pattern
        )
        grey = crop_bbox(to_grey(frame.pixels), frame.scan_bbox)
        image = resize_grey(grey, job.input_size).numpy()
        lab: Mapping[str, object] = frame.labels
        nodule_index = (
            _label_index(NODULE_LABELS, lab.get("nodule") or "none")
            if view in THYROID_VIEWS
            else -1
        )
        lung = _label_index(LUNG_LABELS, lab.get("lung_pattern")) if view == "lung" else -1
        q = lab.get("quality")
        out.append(
            (
                image,
                _label_index(VIEW_LABELS, lab.get("view", view)),
                nodule_index,
                lung,
                float(q) if isinstance(q, int | float) else float("nan"),
                str(lab.get("vendor", job.vendor)),
            )
        )
    return out


def _init_worker() -> None:
    torch.set_num_threads(1)


def simulate_frameset(
    n_studies: int,
    *,
    seed: int,
    input_size: tuple[int, int],
    vendors: Sequence[str] | None = None,
    images_per_study: int = 4,
    sizes: Sequence[tuple[int, int]] = SIM_SIZES,
    size_weights: Sequence[float] = SIM_SIZE_WEIGHTS,
    view_weights: Sequence[float] = SIM_VIEW_WEIGHTS,
    processes: int = 1,
    progress: bool = True,
) -> FrameSet:
    """Simulate ``n_studies`` studies of ``images_per_study`` frames each, labels balanced.

    Each study has one vendor (round robin over ``vendors``, default the simulator's
    training vendors, i.e. all but ``HELD_OUT_VENDOR``) and views drawn with ``view_weights``;
    thyroid frames draw
    none/benign/malignant nodules evenly, lung frames normal/B-lines/consolidation evenly.
    Frames are cropped to the simulator's scan bounding box, made grey and resized to
    ``input_size`` ``(height, width)``. Study ``s`` uses generator ``(seed, s)``, so the
    result does not depend on ``processes``.
    """
    from workers.simulator import HELD_OUT_VENDOR, VENDOR_STYLES

    if vendors is None:
        vendors = [v for v in vendor_names(VENDOR_STYLES) if v != HELD_OUT_VENDOR]
    if not vendors:
        raise ValueError("no vendor to simulate")
    if n_studies < 1 or images_per_study < 1:
        raise ValueError("n_studies and images_per_study must be >= 1")
    jobs = [
        _StudyJob(
            seed,
            s,
            vendors[s % len(vendors)],
            images_per_study,
            (int(input_size[0]), int(input_size[1])),
            tuple((int(x[0]), int(x[1])) for x in sizes),
            tuple(size_weights),
            tuple(view_weights),
        )
        for s in range(n_studies)
    ]
    bar = tqdm(total=n_studies, desc="simulate", unit="study", disable=not progress, leave=False)
    results: list[list[tuple[np.ndarray, int, int, int, float, str]]] = []
    if processes > 1:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(processes, initializer=_init_worker) as pool:
            for item in pool.imap(_simulate_study, jobs, chunksize=8):
                results.append(item)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_simulate_study(job))
            bar.update(1)
    bar.close()
    rows = [(s, frame) for s, study in enumerate(results) for frame in study]
    return FrameSet(
        images=torch.from_numpy(np.stack([f[0] for _, f in rows])),
        labels={
            "view": torch.tensor([f[1] for _, f in rows], dtype=torch.int64),
            "nodule": torch.tensor([f[2] for _, f in rows], dtype=torch.int64),
            "lung_pattern": torch.tensor([f[3] for _, f in rows], dtype=torch.int64),
        },
        quality=torch.tensor([f[4] for _, f in rows], dtype=torch.float32),
        vendor=[f[5] for _, f in rows],
        study=torch.tensor([s for s, _ in rows], dtype=torch.int64),
    )


def vendor_names(styles: object) -> list[str]:
    if isinstance(styles, Mapping):
        return [str(k) for k in styles]
    names = []
    for item in styles:  # type: ignore[attr-defined]
        names.append(str(getattr(item, "name", item)))
    return names


# ----------------------------------------------------------------------------------------
# DICOM folder + labels CSV
# ----------------------------------------------------------------------------------------
def read_labelled_folder(
    folder: Path, labels_csv: Path, *, input_size: tuple[int, int], max_frames: int = 8
) -> FrameSet:
    """Frames of the DICOM files in ``folder`` labelled by ``labels_csv``.

    The CSV has a ``file`` (relative path) or ``sop_instance_uid`` column, optional
    ``study_instance_uid`` and ``vendor``, and one column per task (``view``, ``nodule``,
    ``lung_pattern`` with label names, ``quality`` in [0, 1]); empty cells mean unknown.
    The scan region is taken from the Sequence of Ultrasound Regions when present.

    Raises
    ------
    ValueError
        On a missing column, an unknown label or an unreadable file.
    """
    import pydicom

    with labels_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{labels_csv}: no rows")
    columns = set(rows[0])
    if not columns & {"file", "sop_instance_uid"}:
        raise ValueError(f"{labels_csv}: needs a 'file' or 'sop_instance_uid' column")
    if not columns & {*CLASSIFICATION_HEADS, "quality"}:
        raise ValueError(
            f"{labels_csv}: needs at least one task column "
            f"({', '.join([*CLASSIFICATION_HEADS, 'quality'])})"
        )
    by_uid: dict[str, Path] = {}
    if "file" not in columns:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                try:
                    ds = pydicom.dcmread(
                        path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                    )
                    by_uid[str(ds.SOPInstanceUID)] = path
                except Exception:  # any non-DICOM file is skipped
                    continue
    frames: list[torch.Tensor] = []
    labels = {k: [] for k in CLASSIFICATION_HEADS}  # type: dict[str, list[int]]
    quality: list[float] = []
    vendors: list[str] = []
    studies: list[int] = []
    study_ids: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if row.get("file"):
            path = folder / row["file"]
        else:
            uid = row.get("sop_instance_uid", "")
            if uid not in by_uid:
                raise ValueError(f"{labels_csv}:{line}: no DICOM file with SOP Instance UID {uid}")
            path = by_uid[uid]
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:
            raise ValueError(f"{labels_csv}:{line}: cannot read {path}: {exc}") from exc
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if n_frames == 1:
            pixels = pixels[None]
        photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
        if photometric.startswith("YBR") and pixels.ndim == 4:
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        bbox = None
        regions = getattr(ds, "SequenceOfUltrasoundRegions", None)
        if regions:
            r = regions[0]
            bbox = (
                int(r.RegionLocationMinX0),
                int(r.RegionLocationMinY0),
                int(r.RegionLocationMaxX1) + 1,
                int(r.RegionLocationMaxY1) + 1,
            )
        scale = 255.0 / float(pixels.max() or 1) if pixels.dtype != np.uint8 else 1.0
        study_uid = row.get("study_instance_uid") or str(getattr(ds, "StudyInstanceUID", path))
        for index in np.linspace(0, n_frames - 1, min(max_frames, n_frames)).round().astype(int):
            frame = pixels[index]
            if scale != 1.0:
                frame = np.clip(frame * scale, 0, 255).astype(np.uint8)
            if photometric == "MONOCHROME1":
                frame = 255 - frame
            frames.append(resize_grey(crop_bbox(to_grey(frame), bbox), input_size))
            for task, names in CLASSIFICATION_HEADS.items():
                value = (row.get(task) or "").strip()
                if value and value not in names:
                    raise ValueError(f"{labels_csv}:{line}: {task} {value!r} is not one of {names}")
                labels[task].append(names.index(value) if value else -1)
            q = (row.get("quality") or "").strip()
            quality.append(float(q) if q else float("nan"))
            vendors.append(row.get("vendor") or str(getattr(ds, "Manufacturer", "unknown")))
            studies.append(study_ids.setdefault(study_uid, len(study_ids)))
    return FrameSet(
        images=torch.stack(frames),
        labels={k: torch.tensor(v, dtype=torch.int64) for k, v in labels.items()},
        quality=torch.tensor(quality, dtype=torch.float32),
        vendor=vendors,
        study=torch.tensor(studies, dtype=torch.int64),
    )
