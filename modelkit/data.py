"""Labelled frame sets for training and evaluation (simulated or read from DICOM files).

A :class:`FrameSet` holds grey frames already pre-processed as the node does at inference
(decoded, checked by QC, cropped to QC's scan region with the outside of the sector masked,
resized to the network input: :func:`node_input`), as ``uint8`` (compact: a few thousand
frames are tens of MB), with per-task integer labels (``-1`` where a task does not apply),
the vendor and the study each frame comes from. Splits are always by study, never by frame.

Training and serving share one pre-processing function on purpose: a crop that differs
from the node's (a bounding box without the sector mask, another grey conversion, the
simulator's exact region instead of QC's estimate) silently lowers accuracy in use.
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

import simulator as sim
from simulator.dicom import deterministic_uid
from workers.imaging.pixels import PixelDataError, decode_dataset, load_instance
from workers.imaging.qc import assess_instance
from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance
from workers.models.image_statistics import image_statistics
from workers.models.manifest import InputSpec, Region
from workers.models.nets import CLASSIFICATION_HEADS, LUNG_LABELS, NODULE_LABELS, VIEW_LABELS
from workers.models.preprocess import model_input, resize

logger = logging.getLogger(__name__)

THYROID_VIEWS = ("thyroid_transverse", "thyroid_longitudinal")

_Job = TypeVar("_Job")
_Result = TypeVar("_Result")


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
    qc_excluded: int = 0
    """Frames of the source left out because the node's QC would not analyse them."""
    image_statistics: torch.Tensor | None = None
    """``(N, 12)`` float32: :func:`workers.models.image_statistics.image_statistics` of each
    frame's crop as received (before the resize), for the image-statistics OOD score;
    ``None`` where the source did not measure them."""

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
        if self.image_statistics is not None and (
                self.image_statistics.ndim != 2 or self.image_statistics.shape[0] != n):
            raise ValueError("image_statistics must have one row per frame")

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
            image_statistics=(None if self.image_statistics is None
                              else self.image_statistics[idx]),
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
            qc_excluded=sum(s.qc_excluded for s in sets),
            image_statistics=(
                torch.cat([s.image_statistics for s in sets])  # type: ignore[misc]
                if all(s.image_statistics is not None for s in sets) else None),
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


def node_input(
    instance: DecodedInstance, qc: InstanceQC, index: int, size: tuple[int, int]
) -> torch.Tensor:
    """Frame ``index`` of a decoded instance exactly as the node shows it to a pack.

    The node's own pre-processing (:mod:`workers.models.preprocess`): :func:`model_input`
    (grey crop of QC's scan region, zero outside the sector mask, in ``[0, 1]``), then
    :func:`resize` (bilinear, antialiased) to ``size`` ``(height, width)``. Returned as
    ``(height, width)`` ``uint8``: the only difference from inference is this 8-bit rounding
    after the resize (at most 0.5/255, below the pixels' own 8-bit step); training
    normalises with the same :func:`workers.models.preprocess.normalise`.
    """
    return node_input_and_statistics(instance, qc, index, size, statistics=False)[0]


def node_input_and_statistics(
    instance: DecodedInstance, qc: InstanceQC, index: int, size: tuple[int, int], *,
    statistics: bool = True,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """:func:`node_input`, and the image statistics of the same crop before the resize (as
    the Analyser measures them for a pack's image-statistics OOD score)."""
    crop = model_input(PreparedInstance(instance, qc), index, Region.SCAN_REGION)
    unit = resize(crop, InputSpec(height=int(size[0]), width=int(size[1])))
    image = (unit[0, 0].clamp(0, 1) * 255.0).round().to(torch.uint8)
    return image, (image_statistics(crop) if statistics else None)


# ----------------------------------------------------------------------------------------
# Simulated data
# ----------------------------------------------------------------------------------------
def _label_index(labels: Sequence[str], value: object) -> int:
    return labels.index(str(value)) if value is not None and str(value) in labels else -1


#: Native frame sizes (rows, cols) drawn for simulated images, with their probabilities: the
#: network sees several scanner resolutions before resizing. They are the sizes the node
#: receives (the simulator's studies are 480x640 by default, vendors' screens 480x640 to
#: 768x1024); smaller captures often fail QC's resolution check and are never analysed.
SIM_SIZES: tuple[tuple[int, int], ...] = ((360, 480), (480, 640), (600, 800))
SIM_SIZE_WEIGHTS: tuple[float, ...] = (0.35, 0.45, 0.2)
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
    acquisition: str | None = None
    """An acquisition change of the vendor's scanner (:data:`simulator.ACQUISITION_CHANGES`)."""


_Row = tuple[np.ndarray, int, int, int, float, str, np.ndarray]


def draw_case(
    rng: np.random.Generator,
    view_weights: Sequence[float],
    sizes: Sequence[tuple[int, int]],
    size_weights: Sequence[float],
) -> tuple[str, str | None, str | None, tuple[int, int]]:
    """``(view, nodule, lung pattern, frame size)`` of one simulated image or loop: the view
    by ``view_weights``, a nodule class (thyroid views) or lung pattern (lung) evenly, the
    size by ``size_weights``."""
    view = VIEW_LABELS[int(rng.choice(len(VIEW_LABELS), p=np.asarray(view_weights)))]
    nodule = NODULE_LABELS[int(rng.integers(3))] if view in THYROID_VIEWS else None
    pattern = LUNG_LABELS[int(rng.integers(3))] if view == "lung" else None
    size = sizes[int(rng.choice(len(sizes), p=np.asarray(size_weights)))]
    return view, nodule, pattern, size


def _simulate_study(job: _StudyJob) -> tuple[list[_Row], int]:
    """Frames of one simulated study as the node would see them, and the number of frames
    QC would not let through: ``[(uint8 image, view, nodule, lung, quality, vendor)]``.

    Each frame goes the node's way: a DICOM dataset (the simulator's writer, in memory),
    :func:`workers.imaging.pixels.decode_dataset`, QC, then :func:`node_input`.
    """

    # One generator per study: the data do not depend on the number of worker processes.
    rng = np.random.default_rng([job.seed, job.study])
    context = sim.new_study_context(np.random.default_rng([job.seed, job.study, 1]),
                                    vendor=job.vendor)
    formed = (sim.acquisition_change(job.vendor, job.acquisition) if job.acquisition
              else job.vendor)
    out: list[_Row] = []
    excluded = 0
    for k in range(job.images):
        view, nodule, pattern, size = draw_case(rng, job.view_weights, job.sizes, job.weights)
        frame = sim.simulate_image(
            view, vendor=formed, rng=rng, size=size, nodule=nodule, lung_pattern=pattern
        )
        dataset = sim.build_instance(
            frame,
            vendor=job.vendor,
            study=context,
            series_instance_uid=deterministic_uid(context.study_instance_uid, "series"),
            instance_number=k + 1,
            sop_instance_uid=deterministic_uid(context.study_instance_uid, "sop", k),
        )
        instance = decode_dataset(dataset)
        qc = assess_instance(instance)
        if qc.failed or qc.scan_region is None:
            excluded += 1
            continue
        tensor, stats = node_input_and_statistics(instance, qc, qc.usable_frames[0],
                                                  job.input_size)
        image = tensor.numpy()
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
                np.asarray(stats, np.float32),
            )
        )
    return out, excluded


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_jobs(
    function: Callable[[_Job], _Result],
    jobs: Sequence[_Job],
    *,
    processes: int,
    progress: bool,
    desc: str,
    unit: str,
) -> list[_Result]:
    """``[function(job) for job in jobs]``, in order, in ``processes`` spawned processes
    (one torch thread each) when more than one, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress, leave=False)
    results: list[_Result] = []
    if processes > 1:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(processes, initializer=_init_worker) as pool:
            for item in pool.imap(function, jobs, chunksize=8):
                results.append(item)
                bar.update(1)
    else:
        for job in jobs:
            results.append(function(job))
            bar.update(1)
    bar.close()
    return results


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
    acquisition: str | None = None,
) -> FrameSet:
    """Simulate ``n_studies`` studies of ``images_per_study`` frames each, labels balanced.

    Each study has one vendor (round robin over ``vendors``, default the simulator's
    training vendors, i.e. all but ``simulator.HELD_OUT_VENDOR``) and views drawn with
    ``view_weights``; thyroid frames draw none/benign/malignant nodules evenly, lung frames
    normal/B-lines/consolidation evenly.
    Each frame is written as the simulator's DICOM dataset, decoded and checked by the node's
    QC and pre-processed by :func:`node_input` at ``input_size`` ``(height, width)``, exactly
    as the node would analyse it; frames QC fails are left out (counted in
    ``FrameSet.qc_excluded``). Study ``s`` uses generator ``(seed, s)``, so the result does
    not depend on ``processes``. ``acquisition`` forms every image under one acquisition
    change of its vendor's scanner (:func:`simulator.acquisition_change`: more gain, a
    narrower dynamic range, a coarser probe); the headers still name the vendor.
    """
    if acquisition is not None and acquisition not in sim.ACQUISITION_CHANGES:
        raise ValueError(f"unknown acquisition change {acquisition!r}; one of "
                         f"{', '.join(sim.ACQUISITION_CHANGES)}")

    if vendors is None:
        vendors = [v for v in vendor_names(sim.VENDOR_STYLES) if v != sim.HELD_OUT_VENDOR]
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
            acquisition,
        )
        for s in range(n_studies)
    ]
    results = run_jobs(_simulate_study, jobs, processes=processes, progress=progress,
                       desc="simulate", unit="study")
    rows = [(s, frame) for s, (study, _) in enumerate(results) for frame in study]
    excluded = sum(n for _, n in results)
    if excluded:
        logger.info(
            "%d of %d simulated frames left out: QC fails them", excluded, len(rows) + excluded
        )
    if not rows:
        raise ValueError("QC failed every simulated frame")
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
        qc_excluded=excluded,
        image_statistics=torch.from_numpy(np.stack([f[6] for _, f in rows])),
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
    folder: Path,
    labels_csv: Path | Sequence[Path],
    *,
    input_size: tuple[int, int],
    max_frames: int = 8,
) -> FrameSet:
    """Frames of the DICOM files in ``folder`` labelled by ``labels_csv`` (one CSV or
    several, e.g. the ``labels.csv`` of each study ``sononode simulate`` writes),
    pre-processed as the node does (decoding, QC, :func:`node_input`).

    A CSV has a ``file`` (path relative to ``folder``, else to the CSV's own folder) or
    ``sop_instance_uid`` column, optional ``study_instance_uid`` and ``vendor``, and one
    column per task (``view``, ``nodule``, ``lung_pattern`` with label names, ``quality`` in
    [0, 1]); empty cells mean unknown.
    At most ``max_frames`` frames of a cine loop are used, evenly spread; frames that QC
    would not analyse are left out (counted in ``FrameSet.qc_excluded``).

    Raises
    ------
    ValueError
        On a missing column, an unknown label, an unreadable file or when QC fails every frame.
    """
    import pydicom


    csv_paths = [labels_csv] if isinstance(labels_csv, Path) else list(labels_csv)
    if not csv_paths:
        raise ValueError("no labels CSV given")
    # (csv path, line number, row) of every labelled file.
    rows: list[tuple[Path, int, dict[str, str]]] = []
    for path in csv_paths:
        with path.open(newline="", encoding="utf-8") as handle:
            table = list(csv.DictReader(handle))
        if not table:
            raise ValueError(f"{path}: no rows")
        columns = set(table[0])
        if not columns & {"file", "sop_instance_uid"}:
            raise ValueError(f"{path}: needs a 'file' or 'sop_instance_uid' column")
        if not columns & {*CLASSIFICATION_HEADS, "quality"}:
            raise ValueError(
                f"{path}: needs at least one task column "
                f"({', '.join([*CLASSIFICATION_HEADS, 'quality'])})"
            )
        rows += [(path, line, row) for line, row in enumerate(table, start=2)]
    by_uid: dict[str, Path] = {}
    if any(not row.get("file") for _, _, row in rows):
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
    statistics: list[np.ndarray] = []
    labels: dict[str, list[int]] = {k: [] for k in CLASSIFICATION_HEADS}
    quality: list[float] = []
    vendors: list[str] = []
    studies: list[int] = []
    study_ids: dict[str, int] = {}
    excluded = 0
    for source, line, row in rows:
        where = f"{source}:{line}"
        if row.get("file"):
            path = folder / row["file"]
            if not path.is_file() and (source.parent / row["file"]).is_file():
                path = source.parent / row["file"]
        else:
            uid = row.get("sop_instance_uid", "")
            if uid not in by_uid:
                raise ValueError(f"{where}: no DICOM file with SOP Instance UID {uid}")
            path = by_uid[uid]
        try:
            instance = load_instance(path, max_frames=max_frames)
        except (PixelDataError, OSError) as exc:
            raise ValueError(f"{where}: cannot read {path}: {exc}") from exc
        task_labels: dict[str, int] = {}
        for task, names in CLASSIFICATION_HEADS.items():
            value = (row.get(task) or "").strip()
            if value and value not in names:
                raise ValueError(f"{where}: {task} {value!r} is not one of {names}")
            task_labels[task] = names.index(value) if value else -1
        q = (row.get("quality") or "").strip()
        study_uid = row.get("study_instance_uid") or instance.study_instance_uid or str(path)
        qc = assess_instance(instance)
        usable = [] if qc.failed or qc.scan_region is None else list(qc.usable_frames)
        excluded += len(instance.frame_indices) - len(usable)
        for index in usable:
            frame, stats = node_input_and_statistics(instance, qc, index, input_size)
            frames.append(frame)
            statistics.append(np.asarray(stats, np.float32))
            for task, index_of_label in task_labels.items():
                labels[task].append(index_of_label)
            quality.append(float(q) if q else float("nan"))
            vendors.append(row.get("vendor") or instance.manufacturer or "unknown")
            studies.append(study_ids.setdefault(study_uid, len(study_ids)))
    if excluded:
        logger.info("%s: %d frames left out: QC fails them", folder, excluded)
    if not frames:
        raise ValueError(f"{folder}: QC failed every frame of the labelled files")
    return FrameSet(
        images=torch.stack(frames),
        labels={k: torch.tensor(v, dtype=torch.int64) for k, v in labels.items()},
        quality=torch.tensor(quality, dtype=torch.float32),
        vendor=vendors,
        study=torch.tensor(studies, dtype=torch.int64),
        qc_excluded=excluded,
        image_statistics=torch.from_numpy(np.stack(statistics)),
    )
