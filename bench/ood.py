"""How well each pack's out-of-distribution score separates familiar from unfamiliar input.

AUROC of the OOD score (higher = less familiar) for in-distribution frames against:

(a) other modalities (CT, MR, NM and a radiotherapy portal radiograph from the test files
    pydicom and pynetdicom ship; nothing is downloaded) for the SonoNet pack,
(b) non-fetal ultrasound (simulated abdomen, thyroid, cardiac and lung frames of every
    simulator vendor) for the SonoNet pack,
(c) the simulator vendor held out of the reference pack's training
    (``deploy/models/sononode-us-sim``: its manifest names it) for the reference pack,
(a') other modalities for the reference pack,
(d) the training vendors under each acquisition change (gain +3 / +8 dB, dynamic range
    -15 dB, a coarser probe) for the reference pack.

For a pack with image statistics (``ood.image``) each row of the reference pack comes three
times: the embedding's Mahalanobis score, the image statistics alone, and the node's rule
(out of distribution when either is above its threshold; scored by the larger of the two
score/threshold ratios, flagged above 1).

In distribution: for SonoNet the authors' example frames (``../shared/sononet``) and mild
augmentations of them (:func:`workers.models.sononet.augment`, another seed than the pack's
threshold was set with); for the reference pack fresh simulated frames of its training vendors.
Every frame goes the node's way (DICOM decoding where there is a file, QC's scan region and
mask, :func:`workers.models.inference.model_input`); images QC would refuse (other
modalities, too small) are still scored, on QC's region if it found one, else on the whole
frame. Also printed: the fraction of each set flagged at the pack's threshold, for SonoNet
the fraction whose view the node withholds (Background, out of distribution or below the
confidence floor), and the max-softmax baseline on the same frames for comparison.

    python bench/ood.py [--augmentations 9] [--copies 4] [--per-view 4] [--sononet-pack DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_sr.model import QCOutcome
from modelkit.calibration import roc_auc
from modelkit.sononet_import import Example, augment, model_inputs
from simulator import VENDOR_STYLES, VIEWS, build_instance, new_study_context, simulate_image
from simulator.vendors import ACQUISITION_CHANGES, acquisition_change
from workers.imaging.pixels import decode_dataset, sample_frames
from workers.imaging.qc import assess_instance
from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance
from workers.models.inference import Analyser
from workers.models.manifest import CaptureLayout, Region
from workers.models.ood import EnergyScorer
from workers.models.packs import ModelPack
from workers.models.preprocess import model_input

ROOT = Path(__file__).resolve().parents[1]

SONONET_DIR = Path(os.environ.get("SONONODE_SONONET_DIR", ROOT.parent / "shared" / "sononet"))
REFERENCE_PACK = ROOT / "deploy" / "models" / "sononode-us-sim"
#: pydicom test files of other modalities: CT (3), MR (2), NM (1).
PYDICOM_FILES = (
    "CT_small.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "MR_small.dcm",
    "examples_overlay.dcm",
    "JPEG2000.dcm",
)
#: pynetdicom test file: an RT portal image, the only projection radiograph available
#: locally (pydicom's CR/DX samples are download-only).
PYNETDICOM_FILES = ("RTImageStorage.dcm",)


@dataclass(frozen=True)
class Row:
    """One comparison: in-distribution against one kind of unfamiliar input."""

    pack: str
    method: str
    inside: str
    outside: str
    n_in: int
    n_out: int
    auroc: float
    flagged_in: float | None
    """Fraction of in-distribution frames above the pack's threshold."""
    flagged_out: float | None
    """Fraction of unfamiliar frames above the pack's threshold."""


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """AUROC of ``outside`` (positive) against ``inside`` (negative) scores."""
    scores = np.r_[np.asarray(inside, np.float64), np.asarray(outside, np.float64)]
    labels = np.r_[np.zeros(len(inside), int), np.ones(len(outside), int)]
    return roc_auc(scores, labels)


# ----------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------
def other_modality_files() -> list[Path]:
    """The locally installed test images of other modalities (none is downloaded)."""
    from pydicom.data import get_testdata_file

    found: list[Path] = []
    for name in PYDICOM_FILES:
        path = get_testdata_file(name, download=False)
        if isinstance(path, str):
            found.append(Path(path))
    import pynetdicom

    folder = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"
    found += [folder / name for name in PYNETDICOM_FILES if (folder / name).is_file()]
    return found


def _frames_seen(instance: DecodedInstance, region: Region, *,
                 max_frames: int = 4) -> list[np.ndarray]:
    """What a pack would be shown, QC's verdict aside: the modality is accepted and a frame
    QC rejects is still cropped to the region QC found (else the whole frame)."""

    qc = assess_instance(instance, accept_modalities=(instance.modality or "US",))
    if qc.scan_region is not None and qc.scan_mask is not None:
        everything = tuple(range(instance.frames.shape[0]))
        qc = dataclasses.replace(qc, usable_frames=qc.usable_frames or everything)
    item = PreparedInstance(instance, qc)
    indices = sample_frames(list(qc.usable_frames or range(instance.frames.shape[0])), max_frames)
    return [model_input(item, i, region) for i in indices]


def other_modality_frames(
    region: Region, *, copies: int = 0, seed: int = 0
) -> tuple[list[np.ndarray], int]:
    """Frames of :func:`other_modality_files` and ``copies`` augmented copies of each;
    returns the frames and the number of source images."""
    from pydicom import dcmread


    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    files = other_modality_files()
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd but readable test files
            instance = decode_dataset(dcmread(path), max_frames=1)
        for copy in range(copies + 1):
            if copy:
                instance = dataclasses.replace(instance, frames=augment(instance.frames, rng))
            frames += _frames_seen(instance, region, max_frames=1)
    return frames, len(files)


def fetal_frames(
    examples: Sequence[Example], *, augmentations: int, seed: int = 1,
    layouts: Sequence[CaptureLayout] = (),
) -> list[np.ndarray]:
    """SonoNet's in-distribution frames: each example and ``augmentations`` copies of it,
    cropped as the pack (its capture ``layouts``) has the node crop them."""

    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    for example in examples:
        region = assess_instance(example.instance).scan_region
        frames += model_inputs(example.instance, layouts=layouts)
        for _ in range(augmentations):
            shaken = augment(example.instance.frames, rng, region=region)
            frames += model_inputs(dataclasses.replace(example.instance, frames=shaken),
                                   layouts=layouts)
    return frames


def simulated_frames(
    vendors: Sequence[str], *, per_view: int, seed: int, views: Sequence[str] | None = None,
    change: str | None = None,
) -> list[np.ndarray]:
    """Simulated B-mode frames through DICOM, decoding, QC and cropping, ``per_view`` of
    each view for each vendor (frames QC refuses are left out, as the node does); with
    ``change``, formed under that acquisition change of each vendor's scanner."""

    frames: list[np.ndarray] = []
    for v, vendor in enumerate(vendors):
        rng = np.random.default_rng([seed, v])
        context = new_study_context(rng, vendor=vendor)
        style = acquisition_change(vendor, change) if change else vendor
        for view in views or VIEWS:
            for k in range(per_view):
                frame = simulate_image(view, vendor=style, rng=rng)
                dataset = build_instance(
                    frame, vendor=vendor, study=context, series_instance_uid=f"2.25.{seed}{v}",
                    instance_number=k + 1,
                )
                frames += model_inputs(decode_dataset(dataset), max_frames=1)
    return frames


# ----------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------
def ood_scores(pack: ModelPack, frames: Sequence[np.ndarray]) -> np.ndarray:
    """The pack's OOD scores; a SonoNet pack without a detector is scored by energy."""
    raw = pack.raw_outputs(list(frames))
    if pack.ood is not None:
        return pack.ood.score_outputs(raw)
    assert pack.view_task is not None
    return EnergyScorer.for_task(pack.view_task).score_outputs(raw)


def max_softmax_scores(pack: ModelPack, frames: Sequence[np.ndarray]) -> np.ndarray:
    """The baseline logit score, for comparison: ``-max softmax`` of the view task."""
    assert pack.view_task is not None
    return -pack.predict(list(frames)).probabilities[pack.view_task.name].max(axis=1)


def abstained(pack: ModelPack, frames: Sequence[np.ndarray]) -> float:
    """Fraction of one-frame images the node would withhold the view of with this pack."""

    items = []
    for i, frame in enumerate(frames):
        grey = np.round(np.clip(frame, 0.0, 1.0) * 255.0).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        qc = InstanceQC(outcome=QCOutcome.PASS, checks=(), usable_frames=(0,))
        instance = DecodedInstance.from_pixels(rgb, sop_instance_uid=f"frame-{i}")
        items.append(PreparedInstance(instance, qc))
    result = Analyser([pack], max_frames=1).analyse_study("2.25.1", items)
    withheld = [img.view is None or img.view.abstained for img in result.images]
    return float(np.mean(withheld))


def _row(pack: ModelPack, inside: str, outside: str, s_in: np.ndarray, s_out: np.ndarray,
         *, method: str | None = None, threshold: float | None = None) -> Row:
    spec = pack.manifest.ood
    if method is None:
        threshold = spec.threshold if spec is not None else None
        method = spec.method.value if spec is not None else "energy (no threshold)"
    return Row(
        pack=pack.name,
        method=method,
        inside=inside,
        outside=outside,
        n_in=len(s_in),
        n_out=len(s_out),
        auroc=auroc(s_in, s_out),
        flagged_in=None if threshold is None else float(np.mean(s_in > threshold)),
        flagged_out=None if threshold is None else float(np.mean(s_out > threshold)),
    )


def sononet_rows(
    pack: ModelPack, examples: Sequence[Example], *, augmentations: int, copies: int,
    per_view: int,
    with_abstention: bool = True,
) -> tuple[list[Row], dict[str, float]]:
    """Rows (a) and (b) for a SonoNet pack, and the abstention rate of each set."""

    fetal = fetal_frames(examples, augmentations=augmentations, layouts=pack.input.layouts)
    modality, sources = other_modality_frames(Region.SCAN_REGION, copies=copies)
    other_us = simulated_frames(sorted(VENDOR_STYLES), per_view=per_view, seed=7, views=VIEWS)
    inside = f"{len(examples)} fetal example frames x {augmentations + 1}"
    outsides = {
        f"other modalities ({sources} images x {copies + 1})": modality,
        f"simulated non-fetal US ({len(VENDOR_STYLES)} vendors)": other_us,
    }
    s_fetal = ood_scores(pack, fetal)
    rows = [_row(pack, inside, name, s_fetal, ood_scores(pack, frames))
            for name, frames in outsides.items()]
    m_fetal = max_softmax_scores(pack, fetal)
    for name, frames in outsides.items():
        m_out = max_softmax_scores(pack, frames)
        rows.append(Row(pack.name, "max-softmax", inside, name, len(m_fetal), len(m_out),
                        auroc(m_fetal, m_out), None, None))
    rates: dict[str, float] = {}
    if with_abstention:
        rates = {
            "fetal examples": abstained(pack, fetal),
            "other modalities": abstained(pack, modality),
            "simulated non-fetal US": abstained(pack, other_us),
        }
    return rows, rates


def reference_rows(pack: ModelPack, *, per_view: int, copies: int) -> list[Row]:
    """Rows (c) and (a') for the reference pack: its held-out vendor, other modalities."""
    training = pack.manifest.raw.get("training_data", {})
    held_out = training.get("held_out_vendor")
    seen = training.get("vendors") or []
    if not held_out or not seen:
        raise ValueError(f"{pack.name}: manifest names no held-out vendor / training vendors")
    inside_frames = simulated_frames(seen, per_view=per_view, seed=31)
    held_frames = simulated_frames([held_out] * len(seen), per_view=per_view, seed=32)
    modality, sources = other_modality_frames(pack.input.region, copies=copies)
    inside = f"simulated US, training vendors ({len(seen)})"
    outside = {f"held-out vendor {held_out}": held_frames,
               f"other modalities ({sources} images x {copies + 1})": modality}
    if pack.image_ood is not None:
        for change in ACQUISITION_CHANGES:
            outside[f"training vendors, {change}"] = simulated_frames(
                seen, per_view=max(1, per_view // 2), seed=33, change=change)
    s_in = ood_scores(pack, inside_frames)
    rows = [_row(pack, inside, name, s_in, ood_scores(pack, frames))
            for name, frames in outside.items()]
    spec = pack.manifest.ood
    if pack.image_ood is None or spec is None or spec.image is None:
        return rows
    # The image statistics alone, and the node's rule: out of distribution when either score
    # is above its threshold, i.e. when the larger of the two score/threshold ratios is > 1.
    def image(frames: Sequence[np.ndarray]) -> np.ndarray:
        views = pack.predicted_views(pack.predict(list(frames)).probabilities)
        got = pack.image_ood_scores(list(frames), views)
        assert got is not None
        return got

    def rule(frames: Sequence[np.ndarray]) -> np.ndarray:
        assert spec is not None and spec.image is not None
        return np.maximum(ood_scores(pack, frames) / spec.threshold,
                          image(frames) / spec.image.threshold)

    i_in, r_in = image(inside_frames), rule(inside_frames)
    for name, frames in outside.items():
        rows.append(_row(pack, inside, name, i_in, image(frames), method="image stats",
                         threshold=spec.image.threshold))
        rows.append(_row(pack, inside, name, r_in, rule(frames), method="node's rule",
                         threshold=1.0))
    return rows


def _table(rows: Sequence[Row]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    head = (f"{'pack':16s} {'score':12s} {'in distribution':36s} {'out of distribution':40s} "
            f"{'n in':>5s} {'n out':>5s} {'AUROC':>6s} {'flag in':>7s} {'flag out':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.pack:16s} {r.method:12s} {r.inside:36s} {r.outside:40s} {r.n_in:5d} "
            f"{r.n_out:5d} {r.auroc:6.3f} {pct(r.flagged_in):>7s} {pct(r.flagged_out):>8s}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--augmentations", type=int, default=9,
                        help="augmented copies per fetal example frame")
    parser.add_argument("--copies", type=int, default=4,
                        help="augmented copies per other-modality image")
    parser.add_argument("--per-view", type=int, default=4,
                        help="simulated frames per view and vendor")
    parser.add_argument("--sononet-pack", type=Path, default=None,
                        help="a SonoNet pack (default: imported from ../shared/sononet)")
    args = parser.parse_args()
    # Frames QC refuses are expected here (probe-in-air simulations): no warning per frame.
    logging.basicConfig(level=logging.ERROR)

    rows: list[Row] = []
    notes: list[str] = []
    reference = ModelPack.load(REFERENCE_PACK, device="cpu")
    rows += reference_rows(reference, per_view=args.per_view, copies=args.copies)
    npz = SONONET_DIR / "SonoNet16.npz"
    if args.sononet_pack is not None or npz.is_file():
        from modelkit.sononet_import import EXAMPLES_FOLDER, import_sononet, read_examples

        examples = read_examples(SONONET_DIR / EXAMPLES_FOLDER)
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.sononet_pack or import_sononet(
                npz, Path(tmp) / "sononet16", examples=SONONET_DIR / EXAMPLES_FOLDER
            )
            sononet = ModelPack.load(folder, device="cpu")
        sn_rows, rates = sononet_rows(
            sononet, examples, augmentations=args.augmentations, copies=args.copies,
            per_view=args.per_view,
        )
        rows = sn_rows + rows
        notes.append("SonoNet view withheld (Background, OOD or low confidence): "
                     + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
        if sononet.manifest.ood is not None:
            notes.append(f"SonoNet threshold {sononet.manifest.ood.threshold}: "
                         f"{sononet.manifest.raw['ood'].get('fitted_on', '')}")
    else:
        notes.append(f"SonoNet rows skipped: no weights at {npz}")
    print(_table(rows))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
