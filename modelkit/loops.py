"""Unlabelled cine loops for contrastive pretraining (simulated or read from DICOM files).

A site has thousands of cine loops and few labels. A :class:`LoopSet` holds the frames of
such loops, pre-processed exactly as the node shows them to a pack (decoding, QC,
:func:`modelkit.data.node_input`), grouped by loop and without any label: the only
supervision pretraining uses is which frames come from the same loop
(:mod:`modelkit.pretrain`). Splits are by loop, never by frame.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import simulator as sim
from modelkit.data import (
    SIM_SIZE_WEIGHTS,
    SIM_SIZES,
    SIM_VIEW_WEIGHTS,
    draw_case,
    node_input,
    run_jobs,
)
from simulator.dicom import deterministic_uid
from workers.imaging.pixels import PixelDataError, decode_dataset, load_instance
from workers.imaging.qc import assess_instance
from workers.imaging.types import DecodedInstance

logger = logging.getLogger(__name__)

#: A loop needs two usable frames to give a positive pair.
MIN_FRAMES_PER_LOOP = 2


@dataclass
class LoopSet:
    """Frames ``(N, H, W)`` uint8 of unlabelled loops, each loop's frames contiguous.

    ``loop`` is ``(N,)`` int64, the loop of each frame (``0 .. loops - 1``, non-decreasing);
    ``vendor`` the Manufacturer of each loop (``loops`` entries).
    """

    images: torch.Tensor
    loop: torch.Tensor
    vendor: list[str]
    skipped: int = 0
    """Instances of the source left out: single frames, or fewer usable frames than two."""

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be (N, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        if self.loop.shape != (self.images.shape[0],):
            raise ValueError("loop must have one entry per frame")
        if self.loop.numel() and bool((self.loop.diff() < 0).any()):
            raise ValueError("the frames of each loop must be contiguous, loops in order")
        counts = torch.bincount(self.loop, minlength=len(self.vendor))
        if counts.numel() != len(self.vendor) or bool((counts < MIN_FRAMES_PER_LOOP).any()):
            raise ValueError(
                f"every loop needs at least {MIN_FRAMES_PER_LOOP} frames and a vendor"
            )
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts

    @property
    def loops(self) -> int:
        return len(self.vendor)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def vendor_counts(self) -> dict[str, int]:
        """Loops per vendor."""
        return dict(sorted(Counter(self.vendor).items()))

    def select(self, loops: Sequence[int] | np.ndarray) -> LoopSet:
        """The given loops (renumbered in the given order)."""
        chosen = [int(i) for i in loops]
        index = torch.cat(
            [torch.arange(int(self.starts[i]), int(self.starts[i] + self.counts[i]))
             for i in chosen]
        )
        return LoopSet(
            images=self.images[index],
            loop=torch.repeat_interleave(
                torch.arange(len(chosen)), self.counts[torch.tensor(chosen)]
            ),
            vendor=[self.vendor[i] for i in chosen],
        )

    def split(self, fraction: float, *, seed: int) -> tuple[LoopSet, LoopSet]:
        """``(rest, held_out)``: about ``fraction`` of the loops held out, by loop."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be within (0, 1), got {fraction}")
        order = np.random.default_rng(seed).permutation(self.loops)
        cut = max(1, round(fraction * self.loops))
        if cut >= self.loops:
            raise ValueError(f"{self.loops} loops cannot be split into two non-empty parts")
        return self.select(np.sort(order[cut:])), self.select(np.sort(order[:cut]))


def _from_rows(rows: Sequence[tuple[list[np.ndarray], str]], skipped: int) -> LoopSet:
    kept = [(frames, vendor) for frames, vendor in rows if len(frames) >= MIN_FRAMES_PER_LOOP]
    skipped += len(rows) - len(kept)
    if not kept:
        raise ValueError(
            f"no loop with at least {MIN_FRAMES_PER_LOOP} frames QC would analyse"
        )
    return LoopSet(
        images=torch.from_numpy(np.stack([f for frames, _ in kept for f in frames])),
        loop=torch.repeat_interleave(
            torch.arange(len(kept)), torch.tensor([len(frames) for frames, _ in kept])
        ),
        vendor=[vendor for _, vendor in kept],
        skipped=skipped,
    )


def _loop_frames(instance: DecodedInstance, input_size: tuple[int, int]) -> list[np.ndarray]:
    """The frames QC would analyse, as the node shows them to a pack."""
    qc = assess_instance(instance)
    if qc.failed or qc.scan_region is None:
        return []
    return [node_input(instance, qc, i, input_size).numpy() for i in qc.usable_frames]


# ----------------------------------------------------------------------------------------
# Simulated loops
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LoopJob:
    seed: int
    loop: int
    vendor: str
    frames: int
    input_size: tuple[int, int]
    acquisition: str | None


def _simulate_loop(job: _LoopJob) -> tuple[list[np.ndarray], str]:
    """One simulated cine loop through the node's path: a US Multi-frame Image dataset,
    :func:`decode_dataset`, QC, :func:`node_input`. Its labels are dropped."""
    rng = np.random.default_rng([job.seed, job.loop])
    context = sim.new_study_context(np.random.default_rng([job.seed, job.loop, 1]),
                                    vendor=job.vendor)
    formed = (sim.acquisition_change(job.vendor, job.acquisition) if job.acquisition
              else job.vendor)
    view, nodule, pattern, size = draw_case(rng, SIM_VIEW_WEIGHTS, SIM_SIZES, SIM_SIZE_WEIGHTS)
    frames = sim.simulate_loop(view, vendor=formed, rng=rng, n_frames=job.frames, size=size,
                               nodule=nodule, lung_pattern=pattern)
    dataset = sim.build_instance(
        frames,
        vendor=job.vendor,
        study=context,
        series_instance_uid=deterministic_uid(context.study_instance_uid, "series"),
        sop_instance_uid=deterministic_uid(context.study_instance_uid, "sop", 0),
    )
    instance = decode_dataset(dataset, max_frames=job.frames)
    return _loop_frames(instance, job.input_size), job.vendor


def simulate_loopset(
    n_loops: int,
    *,
    seed: int,
    input_size: tuple[int, int],
    vendors: Sequence[str] | None = None,
    frames_per_loop: int = 8,
    acquisition: str | None = None,
    processes: int = 1,
    progress: bool = True,
) -> LoopSet:
    """Simulate ``n_loops`` unlabelled cine loops of ``frames_per_loop`` frames.

    Vendors round robin over ``vendors`` (default the simulator's training vendors); views,
    nodules and lung patterns drawn as :func:`modelkit.data.simulate_frameset` draws them,
    then forgotten. Loop ``i`` uses generator ``(seed, i)``: the data do not depend on
    ``processes``. Loops with fewer than two frames QC would analyse are left out
    (``LoopSet.skipped``).
    """
    if n_loops < 1 or frames_per_loop < MIN_FRAMES_PER_LOOP:
        raise ValueError(
            f"need n_loops >= 1 and frames_per_loop >= {MIN_FRAMES_PER_LOOP}, got "
            f"{n_loops} and {frames_per_loop}"
        )
    if acquisition is not None and acquisition not in sim.ACQUISITION_CHANGES:
        raise ValueError(f"unknown acquisition change {acquisition!r}")
    names = list(vendors) if vendors is not None else list(sim.TRAINING_VENDORS)
    unknown = [v for v in names if v not in sim.VENDOR_STYLES]
    if not names or unknown:
        raise ValueError(f"unknown or no vendors {unknown}; one of {', '.join(sim.VENDOR_STYLES)}")
    jobs = [
        _LoopJob(seed, i, names[i % len(names)], frames_per_loop,
                 (int(input_size[0]), int(input_size[1])), acquisition)
        for i in range(n_loops)
    ]
    rows = run_jobs(_simulate_loop, jobs, processes=processes, progress=progress,
                    desc="simulate loops", unit="loop")
    return _from_rows(rows, 0)


# ----------------------------------------------------------------------------------------
# Loops from DICOM files
# ----------------------------------------------------------------------------------------
def read_loop_folder(
    folder: Path, *, input_size: tuple[int, int], max_frames: int = 16
) -> LoopSet:
    """Every multi-frame DICOM file under ``folder`` as one unlabelled loop.

    At most ``max_frames`` frames of a loop are decoded, evenly spread; single-frame
    instances, files that are not decodable images and loops with fewer than two frames QC
    would analyse are skipped and counted (a folder of a site's exported cine loops holds
    other files too). Nothing is read from the headers but the Manufacturer.

    Raises
    ------
    ValueError
        When ``folder`` is not a folder or no file under it gives a loop.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    rows: list[tuple[list[np.ndarray], str]] = []
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            instance = load_instance(path, max_frames=max_frames)
        except (PixelDataError, OSError) as exc:
            logger.debug("%s skipped: %s", path, exc)
            skipped += 1
            continue
        if len(instance.frame_indices) < MIN_FRAMES_PER_LOOP:
            skipped += 1
            continue
        rows.append((_loop_frames(instance, input_size), instance.manufacturer or "unknown"))
    if not rows:
        raise ValueError(f"{folder}: no multi-frame DICOM image (cine loop) to learn from")
    loops = _from_rows(rows, skipped)
    logger.info("%s: %d loops, %d frames, %d files skipped", folder, loops.loops, len(loops),
                loops.skipped)
    return loops
