"""``sononode model import-sononet``: the published SonoNet-16 weights into a model pack.

- :func:`load_npz_state_dict`: the Lasagne arrays ``arr_0 ... arr_74`` of
  ``baumgach/SonoNet-weights`` mapped onto :class:`workers.models.sononet.SonoNet16`.
- :func:`read_examples`, :func:`augment`, :func:`fit_energy_threshold`: the
  out-of-distribution threshold of the pack (energy of the logits) set on in-distribution
  frames without any training data: the authors' example frames and mild augmentations of
  them, or site data.
- :func:`pack_manifest`, :func:`import_sononet`, :func:`main`: the manifest, model card and
  pack folder (``docs/MODEL_PACK.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modelkit.pack_writer import write_pack
from workers.imaging.pixels import PixelDataError, load_instance, sample_frames
from workers.imaging.qc import assess_instance
from workers.imaging.types import Box, DecodedInstance, PreparedInstance
from workers.models.manifest import (
    FORMAT_VERSION,
    CaptureLayout,
    Manifest,
    Region,
    abstention_rules,
)
from workers.models.ood import EnergyScorer
from workers.models.packs import ModelPack
from workers.models.preprocess import model_input
from workers.models.sononet import (
    ABSTAIN_LABEL,
    AUTHORS_CAPTURE,
    AUTHORS_CROP,
    BN_EPS,
    CITATION,
    INPUT_SCALE,
    INPUT_SIZE,
    LABEL_CODES,
    SONONET_LABELS,
    SOURCE,
    SonoNet16,
    SonoNetLabel,
)

logger = logging.getLogger(__name__)

#: Fraction of in-distribution frames the OOD threshold keeps (true-positive rate).
OOD_TPR = 0.95
#: Augmented copies per in-distribution frame when the OOD threshold is set.
OOD_AUGMENTATIONS = 9
#: Most in-distribution frames the threshold may reject, left out of its fit (the margin
#: over the TPR quantile is chosen for it: :func:`loo_margin`).
OOD_MAX_REJECTION = 0.05
#: Folder of example frames looked for beside the npz when no ``--examples`` is given.
EXAMPLES_FOLDER = "example_images"
#: File types :func:`read_examples` reads (DICOM files through the node's own decoder).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")

def load_npz_state_dict(npz_path: str | Path) -> dict[str, torch.Tensor]:
    """Map the Lasagne arrays ``arr_0 ... arr_74`` onto :class:`SonoNet16`'s state dict.

    Per convolution the npz holds five arrays: weights ``(out, in, kh, kw)``, then batch-norm
    beta, gamma, mean and ``inv_std = 1 / sqrt(var + 1e-4)``; the variance is recovered as
    ``1 / inv_std**2 - 1e-4`` so that PyTorch's ``BatchNorm2d(eps=1e-4)`` reproduces it.

    Raises
    ------
    FileNotFoundError
        If ``npz_path`` does not exist.
    ValueError
        If the file is not an npz of ``arr_i`` arrays, has another number of arrays, an array
        of the wrong shape, or a non-positive ``inv_std``.
    """
    path = Path(npz_path)
    template = SonoNet16()
    layers = template.layers_in_npz_order()
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.asarray(archive[name]) for name in archive.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable npz archive: {exc}") from exc
    expected = [f"arr_{i}" for i in range(5 * len(layers))]
    if sorted(arrays) != sorted(expected):
        raise ValueError(
            f"{path}: expected the {len(expected)} arrays arr_0..arr_{len(expected) - 1} of "
            f"SonoNet-16, found {len(arrays)} ({', '.join(sorted(arrays)[:5])}...)"
        )
    state: dict[str, torch.Tensor] = {}
    for i, (prefix, layer) in enumerate(layers):
        base = 5 * i
        weight, beta, gamma, mean, inv_std = (arrays[f"arr_{base + k}"] for k in range(5))
        channels = layer.conv.out_channels
        wanted = [
            (f"arr_{base}", weight, tuple(layer.conv.weight.shape), "weights"),
            (f"arr_{base + 1}", beta, (channels,), "batch-norm beta"),
            (f"arr_{base + 2}", gamma, (channels,), "batch-norm gamma"),
            (f"arr_{base + 3}", mean, (channels,), "batch-norm mean"),
            (f"arr_{base + 4}", inv_std, (channels,), "batch-norm inv_std"),
        ]
        for name, array, shape, what in wanted:
            if tuple(array.shape) != shape:
                raise ValueError(
                    f"{path}: {name} ({what} of layer {prefix}) has shape {tuple(array.shape)}, "
                    f"SonoNet-16 expects {shape}"
                )
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{path}: {name} ({what} of layer {prefix}) is not finite")
        inv = inv_std.astype(np.float64)
        if np.any(inv <= 0):
            raise ValueError(f"{path}: arr_{base + 4} (inv_std of layer {prefix}) must be > 0")
        var = 1.0 / inv**2 - BN_EPS
        if np.any(var < 0):
            # inv_std > 100 cannot come from var + eps with var >= 0; clamp rather than NaN.
            logger.warning("%s: layer %s has inv_std above 1/sqrt(eps); clamped", path, prefix)
            var = np.maximum(var, 0.0)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

        state[f"{prefix}.conv.weight"] = tensor(weight)
        state[f"{prefix}.bn.weight"] = tensor(gamma)
        state[f"{prefix}.bn.bias"] = tensor(beta)
        state[f"{prefix}.bn.running_mean"] = tensor(mean)
        state[f"{prefix}.bn.running_var"] = tensor(var)
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    missing = set(template.state_dict()) ^ set(state)
    if missing:  # pragma: no cover - guards the mapping above against a network change
        raise ValueError(f"state dict keys do not match SonoNet16: {sorted(missing)}")
    return state


def load_sononet(npz_path: str | Path, *, input_scale: float = 1.0) -> SonoNet16:
    """A :class:`SonoNet16` in eval mode with the weights of ``npz_path``."""
    model = SonoNet16(input_scale=input_scale)
    model.load_state_dict(load_npz_state_dict(npz_path))
    return model.eval()


def _clip_region(region: Sequence[int], shape: tuple[int, ...]) -> Box:
    if len(region) != 4:
        raise ValueError(f"scan_region must be (c0, r0, c1, r1), got {region!r}")
    c0, r0, c1, r1 = (int(v) for v in region)
    rows, cols = shape[:2]
    c0, c1 = max(0, c0), min(cols, c1)
    r0, r1 = max(0, r0), min(rows, r1)
    if c1 - c0 < 16 or r1 - r0 < 16:
        raise ValueError(
            f"scan_region {tuple(region)} leaves {max(0, c1 - c0)} x {max(0, r1 - r0)} pixels "
            f"of a {cols} x {rows} frame; at least 16 x 16 needed"
        )
    return c0, r0, c1, r1


# ----------------------------------------------------------------------------------------
# In-distribution frames and the out-of-distribution threshold
# ----------------------------------------------------------------------------------------
def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def label_from_name(stem: str) -> str | None:
    """The label a file name states (``"SPINE-CORONAL"`` -> ``"Spine (cor.)"``), if any.

    Names are compared without case and punctuation; a label matches when one of the two is a
    prefix of the other (``spinecoronal`` / ``spinecor``) and exactly one label does.
    """
    name = _key(stem)
    keys = {label: _key(label) for label in SONONET_LABELS}
    exact = [label for label, key in keys.items() if key == name]
    if exact:
        return exact[0]
    if len(name) < 3:
        return None
    hits = [label for label, key in keys.items() if name.startswith(key) or key.startswith(name)]
    return hits[0] if len(hits) == 1 else None


@dataclass(frozen=True)
class Example:
    """An in-distribution image: decoded as the node decodes it, with its label if known."""

    name: str
    label: str | None
    instance: DecodedInstance


def read_examples(folder: str | Path, *, max_frames: int = 16) -> list[Example]:
    """In-distribution images of ``folder``: screen captures (TIFF, PNG, JPEG, BMP) and DICOM.

    Image files become one-frame RGB ultrasound instances; DICOM files are decoded by
    :func:`workers.imaging.pixels.load_instance` (header regions kept). The label is read from the
    file name (:func:`label_from_name`), e.g. ``4CH.tiff``.

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a directory.
    ValueError
        If a file cannot be read, or the folder holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder of example frames at {root}")
    examples = []
    for path in sorted(root.iterdir()):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            try:
                with Image.open(path) as image:
                    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
            except OSError as exc:
                raise ValueError(f"{path}: not a readable image: {exc}") from exc
            instance = DecodedInstance.from_pixels(
                rgb, sop_instance_uid=path.stem, manufacturer=""
            )
        elif suffix in DICOM_SUFFIXES:
            try:
                instance = load_instance(path, max_frames=max_frames)
            except (PixelDataError, OSError) as exc:
                raise ValueError(f"{path}: not a decodable DICOM image: {exc}") from exc
        else:
            continue
        examples.append(Example(path.stem, label_from_name(path.stem), instance))
    if not examples:
        raise ValueError(
            f"{root} holds no example frame ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})"
        )
    return examples


def augment(
    frames: np.ndarray, rng: np.random.Generator, *, region: Sequence[int] | None = None
) -> np.ndarray:
    """A mildly different acquisition of ``(N, H, W, 3)`` ``uint8`` frames (same shape).

    One draw per call, shared by all frames, applied inside ``region`` (the scan region's
    ``(column0, row0, column1, row1)``; the whole frame when ``None``) so that the vendor's
    user interface around it stays as it was: overall gain (x0.85-1.2), grey-map gamma
    (0.87-1.15), multiplicative speckle-like noise (unit mean, 7-14% standard deviation,
    correlated over two pixels), a zoom (crop of 92-100% resized back) and a shift of up to
    3% of the region (edges filled black).

    Raises
    ------
    ValueError
        If ``frames`` is not ``(N, H, W, 3)`` ``uint8`` or ``region`` is not inside it.
    """
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"augment expects (N, H, W, 3) uint8 frames, got {array.shape}")
    c0, r0, c1, r1 = _clip_region(
        region if region is not None else (0, 0, array.shape[2], array.shape[1]), array.shape[1:]
    )
    rows, cols = r1 - r0, c1 - c0
    gain, gamma = rng.uniform(0.85, 1.2), rng.uniform(0.87, 1.15)
    shape_k = rng.uniform(50.0, 200.0)  # gamma-distributed noise: std = 1 / sqrt(k)
    scale = rng.uniform(0.92, 1.0)
    h, w = max(16, round(rows * scale)), max(16, round(cols * scale))
    top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
    dy = int(rng.integers(-round(0.03 * rows), round(0.03 * rows) + 1))
    dx = int(rng.integers(-round(0.03 * cols), round(0.03 * cols) + 1))
    out = array.copy()
    for i in range(array.shape[0]):
        inside = array[i, r0:r1, c0:c1]
        zoomed = Image.fromarray(inside[top : top + h, left : left + w]).resize(
            (cols, rows), Image.Resampling.BILINEAR
        )
        x = np.asarray(zoomed, np.float32) / 255.0
        x = np.clip(x * gain, 0.0, 1.0) ** gamma
        noise = rng.gamma(shape_k, 1.0 / shape_k, size=((rows + 1) // 2, (cols + 1) // 2))
        noise = np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)[:rows, :cols]
        x = np.clip(x * noise[..., None].astype(np.float32), 0.0, 1.0)
        shifted = np.zeros_like(x)
        src = x[max(0, -dy) : rows - max(0, dy), max(0, -dx) : cols - max(0, dx)]
        top_out, left_out = max(0, dy), max(0, dx)
        shifted[top_out : top_out + src.shape[0], left_out : left_out + src.shape[1]] = src
        out[i, r0:r1, c0:c1] = np.round(shifted * 255.0).astype(np.uint8)
    return out


def model_inputs(
    instance: DecodedInstance, *, max_frames: int = 16, layouts: Sequence[CaptureLayout] = ()
) -> list[np.ndarray]:
    """The pack's input crops of ``instance`` exactly as the node makes them.

    Quality control (:func:`workers.imaging.qc.assess_instance`) finds the scan region; every usable
    frame (at most ``max_frames``, evenly spread) is cropped by
    :func:`workers.models.preprocess.model_input`: to a capture layout's fixed crop (of
    ``layouts``, the pack's) where the frame has one, else to the scan region, masked. An
    instance failing QC gives no input.
    """
    qc = assess_instance(instance)
    if qc.failed:
        failing = [c.message for c in qc.checks if c.outcome.value == "fail"]
        logger.warning("%s fails QC (%s): not used", instance.sop_instance_uid, "; ".join(failing))
        return []
    item = PreparedInstance(instance, qc)
    return [
        model_input(item, index, Region.SCAN_REGION, layouts)
        for index in sample_frames(list(qc.usable_frames), max_frames)
    ]


@dataclass(frozen=True)
class EnergyFit:
    """An energy threshold set on in-distribution frames, with what it was set on."""

    threshold: float
    tpr: float
    frames: int
    examples: int
    augmentations: int
    energies: np.ndarray
    """Energy of every frame used, originals and augmented copies."""
    labelled: int
    """Frames of labelled originals that passed QC."""
    accuracy: float | None
    """Accuracy on those (``None``: no labelled example)."""
    labelled_augmented: int
    """Frames of labelled originals and their augmented copies that passed QC."""
    augmented_accuracy: float | None
    """Accuracy on those."""
    margin: float = 0.0
    """Added to the ``tpr`` quantile (:func:`loo_margin`); part of :attr:`threshold`."""
    held_out_frames: int = 0
    """Frames scored by the leave-one-example-out check (0: fewer than 3 examples)."""
    held_out_rejected: int = 0
    """Of those, rejected by the rule (quantile and margin) fitted without their example."""
    held_out_rejected_plain: int = 0
    """Of those, rejected by the plain quantile fitted without their example."""


def loo_margin(energies: np.ndarray, groups: np.ndarray, *, tpr: float,
               max_rejection: float) -> float:
    """The margin over the ``tpr`` quantile that rejects at most ``max_rejection`` of frames
    the quantile was not fitted on.

    Each example (``groups``: its frames, the original with its augmented copies) is left
    out in turn; its frames' energies above the quantile of the others' are the rejections
    the plain rule makes on unseen examples, and the margin is the ``1 - max_rejection``
    quantile of those excesses (never negative). With fewer than two examples there is
    nothing to leave out: 0.
    """
    ids = np.unique(groups)
    if len(ids) < 2:
        return 0.0
    excess = np.concatenate([
        energies[groups == g] - np.quantile(energies[groups != g], tpr) for g in ids])
    return max(0.0, float(np.quantile(excess, 1.0 - max_rejection, method="higher")))


def held_out_rejections(energies: np.ndarray, groups: np.ndarray, *, tpr: float,
                        max_rejection: float | None) -> tuple[int, int]:
    """Frames scored and rejected when each example is left out of the whole rule in turn
    (quantile and, unless ``max_rejection`` is ``None``, margin, the margin chosen among the
    other examples only): the rule's false rejections on examples it never saw."""
    scored = rejected = 0
    for g in np.unique(groups):
        fit = groups != g
        threshold = float(np.quantile(energies[fit], tpr))
        if max_rejection is not None:
            threshold += loo_margin(energies[fit], groups[fit], tpr=tpr,
                                    max_rejection=max_rejection)
        held = energies[groups == g]
        scored += len(held)
        rejected += int((held > threshold).sum())
    return scored, rejected


def fit_energy_threshold(
    pack: ModelPack,
    examples: Sequence[Example],
    *,
    tpr: float = OOD_TPR,
    augmentations: int = OOD_AUGMENTATIONS,
    max_rejection: float = OOD_MAX_REJECTION,
    seed: int = 0,
) -> EnergyFit:
    """Set the pack's energy threshold so that in-distribution frames it never saw stay
    below it.

    Every example and ``augmentations`` augmented copies of it (:func:`augment`) go through
    the node's own QC and cropping (:func:`model_inputs`) and the pack (energy:
    :class:`workers.models.packs.EnergyScorer` of the pack's view task). The threshold is
    the ``tpr`` quantile of their energies plus :func:`loo_margin`, which a quantile fitted
    on the examples themselves needs to keep unseen ones: the plain quantile rejects
    ``1 - tpr`` of the frames it was fitted on and more of the others. With three examples
    or more, :func:`held_out_rejections` checks the whole rule leaving each example out
    (the figures the manifest reports). Also reports the accuracy on the labelled examples.

    Raises
    ------
    ValueError
        If ``tpr`` is outside ``(0, 1]``, ``augmentations`` negative, or no example passes QC.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be within (0, 1], got {tpr}")
    if augmentations < 0:
        raise ValueError(f"augmentations must be >= 0, got {augmentations}")
    task = pack.view_task
    if task is None:
        raise ValueError(f"model pack {pack.name} has no view task to score")
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    truth: list[str | None] = []
    original: list[bool] = []
    group: list[int] = []
    used = 0
    for number, example in enumerate(examples):
        region = assess_instance(example.instance).scan_region
        for copy in range(augmentations + 1):
            instance = example.instance
            if copy:
                frames = augment(instance.frames, rng, region=region)
                instance = dataclasses.replace(instance, frames=frames)
            inputs = model_inputs(instance, layouts=pack.input.layouts)
            crops += inputs
            group += [number] * len(inputs)
            truth += [example.label] * len(inputs)
            original += [copy == 0] * len(inputs)
            used += bool(inputs and copy == 0)
    if not crops:
        raise ValueError("no in-distribution frame passed QC: cannot set an OOD threshold")
    raw = pack.raw_outputs(crops)
    scorer = EnergyScorer.for_task(task)
    energies = scorer.score_outputs(raw)
    predicted = [
        task.label_names[int(i)] for i in np.mean([m[task.output] for m in raw], 0).argmax(1)
    ]

    def accuracy(keep: Sequence[bool]) -> tuple[int, float | None]:
        pairs = [(p, t) for p, t, k in zip(predicted, truth, keep, strict=True) if k and t]
        return len(pairs), (sum(p == t for p, t in pairs) / len(pairs) if pairs else None)

    labelled, acc = accuracy(original)
    labelled_augmented, augmented_acc = accuracy([True] * len(crops))
    groups = np.asarray(group)
    margin = loo_margin(energies, groups, tpr=tpr, max_rejection=max_rejection)
    held_out = plain = (0, 0)
    if len(np.unique(groups)) >= 3:  # the margin of each left-out fit needs two examples
        held_out = held_out_rejections(energies, groups, tpr=tpr, max_rejection=max_rejection)
        plain = held_out_rejections(energies, groups, tpr=tpr, max_rejection=None)
    return EnergyFit(
        threshold=float(np.quantile(energies, tpr)) + margin,
        margin=margin,
        held_out_frames=held_out[0],
        held_out_rejected=held_out[1],
        held_out_rejected_plain=plain[1],
        tpr=tpr,
        frames=len(crops),
        examples=used,
        augmentations=augmentations,
        energies=energies,
        labelled=labelled,
        accuracy=acc,
        labelled_augmented=labelled_augmented,
        augmented_accuracy=augmented_acc,
    )


def ood_manifest(fit: EnergyFit, source: str) -> dict[str, Any]:
    """The manifest's ``ood`` block for an energy threshold ``fit`` on frames from ``source``."""
    copies = (
        f"x {fit.augmentations + 1} (each original and {fit.augmentations} mild augmentations: "
        "gain, gamma, speckle noise, zoom crops, shifts)"
        if fit.augmentations
        else "(no augmentation)"
    )
    if fit.held_out_frames:
        held_out = (
            f"; leaving each example out of the fit in turn (its copies with it), the rule "
            f"rejected {fit.held_out_rejected} of {fit.held_out_frames} unseen frames "
            f"(the quantile alone: {fit.held_out_rejected_plain})"
        )
    else:
        held_out = "; too few examples (under 3) to check it on frames left out of the fit"
    block: dict[str, Any] = {
        "method": "energy",
        "task": "view",
        "temperature": 1.0,
        "threshold": round(fit.threshold, 4),
        "tpr": fit.tpr,
        "margin": round(fit.margin, 4),
        "fitted_on": (
            f"threshold at {fit.tpr:.0%} TPR on {fit.examples} example frame(s) from {source} "
            f"{copies} = {fit.frames} frames, through the node's own QC and cropping, plus a "
            f"margin of {fit.margin:.3f} for frames the fit never saw{held_out}; it rests on "
            f"{fit.examples} example(s) only: no other in-distribution (fetal) data was "
            "available. Refit on site data: sononode model import-sononet NPZ --out PACK "
            "--examples DIR"
        ),
        "note": (
            "energy = -logsumexp(view logits); above the threshold the frame is out of "
            "distribution and the view is withheld for review. Needs no training data."
        ),
    }
    if fit.held_out_frames:
        block["held_out"] = {
            "method": "leave one example out (with its augmented copies); the margin of "
                      "each left-out fit chosen among the other examples only",
            "examples": fit.examples,
            "frames": fit.held_out_frames,
            "rejected": fit.held_out_rejected,
            "rejected_by_quantile_alone": fit.held_out_rejected_plain,
            "max_rejection": OOD_MAX_REJECTION,
        }
    return block


# ----------------------------------------------------------------------------------------
# Model pack
# ----------------------------------------------------------------------------------------
def pack_manifest(
    *,
    name: str = "sononet16",
    version: str = "1.0.0",
    ood: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a SonoNet-16 pack, without ``members`` (``write_pack`` adds them).

    ``ood`` is the out-of-distribution block (:func:`ood_manifest`; ``None``: no detector)
    and ``metrics`` what was measured on the example frames.
    """
    return {
        "name": name,
        "version": version,
        "description": (
            "SonoNet-16 fetal standard scan plane classifier (13 standard planes and "
            "background), published weights converted from Lasagne. Class maps localise the "
            "detected plane."
        ),
        "architecture": {"name": "sononet16", "params": {"input_scale": INPUT_SCALE}},
        "input": {
            "height": INPUT_SIZE[0],
            "width": INPUT_SIZE[1],
            "channels": 1,
            "region": "scan_region",
            # The authors' normalisation is per-image z-score times 255: the pack format
            # has no such mode, so the z-score is "per_image" and the x255 is the network's
            # input_scale parameter.
            "normalisation": {"mode": "per_image", "scheme": "sononet", "scale": INPUT_SCALE},
            # The authors' captures are cropped where the authors cropped them: QC's scan
            # region of these frames also holds the on-image annotations (depth ticks, the
            # settings column), at another scale and aspect than the weights learnt.
            "layouts": [
                {
                    "rows": AUTHORS_CAPTURE[0],
                    "columns": AUTHORS_CAPTURE[1],
                    "crop": list(AUTHORS_CROP),
                    "source": (
                        "the authors' pre-processing of their Voluson E8 screen captures "
                        "(baumgach/SonoNet-weights)"
                    ),
                }
            ],
        },
        "tasks": {
            "view": {
                "kind": "classification",
                "role": "view",
                "output": "logits",
                "labels": [
                    {
                        "name": label.value,
                        "code": {
                            "value": LABEL_CODES[label].value,
                            "scheme": LABEL_CODES[label].scheme,
                            "meaning": LABEL_CODES[label].meaning,
                        },
                        "severity": 0,
                    }
                    for label in SonoNetLabel
                ],
                "calibration": {
                    "method": "temperature",
                    "temperature": 1.0,
                    "note": (
                        "uncalibrated: no labelled fetal ultrasound data is available to this "
                        "node to fit a temperature; refit with 'sononode model calibrate'"
                    ),
                },
                "threshold": 0.5,
                "abstain_labels": [ABSTAIN_LABEL],
                "applies_to": None,
            }
        },
        "ood": ood,
        "training_data": {
            "description": (
                "Baumgartner et al. 2017: 2694 2D fetal ultrasound examinations (18-22 weeks, "
                "GE Voluson E8, UK), frames labelled with 13 standard planes plus background. "
                "Not retrained or calibrated here."
            ),
            "simulated": False,
        },
        "metrics": metrics or {},
        "citation": CITATION,
        "license": "Apache-2.0",
        "source": SOURCE,
        "localisation": {
            "task": "view",
            "output": "class_maps",
            "fraction": 0.5,
            "method": "class map of the reported plane > 50% of its range, largest component",
        },
    }


def _model_card(manifest: dict[str, Any]) -> str:
    labels = ", ".join(SONONET_LABELS)
    ood = manifest.get("ood")
    if ood:
        ood_text = (
            f"Out of distribution: energy of the view logits (-logsumexp); a frame above "
            f"{ood['threshold']} is out of distribution and its view is withheld for review. "
            f"{ood['fitted_on']}.\n"
        )
    else:
        ood_text = (
            "Out of distribution: no detector (no in-distribution frames were given to set a "
            "threshold); only the Background class and the confidence floor abstain.\n"
        )
    examples = manifest.get("metrics", {}).get("example_frames")
    example_text = ""
    if examples:
        example_text = (
            f"\nExample frames: accuracy {examples['accuracy']} on {examples['n']} labelled "
            f"frames, {examples['accuracy_augmented']} on {examples['n_augmented']} with "
            "augmented copies. These are frames of the authors' own test set: a check of the "
            "conversion and pre-processing, not a validation.\n"
        )
    return (
        f"# {manifest['name']} {manifest['version']}\n\n"
        "SonoNet-16 fetal standard scan plane classifier, weights from "
        f"`{SOURCE}` (Apache-2.0), converted with `sononode model import-sononet`.\n\n"
        f"Cite: {CITATION}\n\n"
        f'Labels: {labels}. "Background" (no standard plane) is never reported.\n\n'
        f"Input: on {AUTHORS_CAPTURE[0]} x {AUTHORS_CAPTURE[1]} captures of the authors' "
        f"layout their fixed crop (columns {AUTHORS_CROP[0]}..{AUTHORS_CROP[2] - 1}, rows "
        f"{AUTHORS_CROP[1]}..{AUTHORS_CROP[3] - 1}); on frames of any other layout QC's scan "
        "region (outside of the sector masked); then grey, 224 x 288, per-image z-score "
        "times 255, as the authors pre-processed their captures.\n\n"
        "Localisation: the class map of the reported plane, thresholded at half its range, "
        "gives the image region referenced in the report.\n\n"
        "Calibration: none (temperature 1.0). No fetal data was available here to calibrate "
        "or evaluate on; probabilities are the network's raw softmax.\n\n"
        f"{ood_text}{example_text}"
        "\nWhen the node withholds or doubts a result (in this order):\n\n"
        + "".join(f"- {rule}\n" for rule in abstention_rules(parsed_manifest(manifest)))
    )


def parsed_manifest(manifest: dict[str, Any]) -> Manifest:
    """:func:`pack_manifest`'s document as the node reads it, before ``write_pack`` has
    added the format version and the members (one placeholder member)."""
    return Manifest.from_dict({**manifest, "format_version": FORMAT_VERSION,
                               "members": [{"weights": "weights.pt", "sha256": "0" * 64}]})


def _in_memory_pack(manifest: dict[str, Any], state: dict[str, torch.Tensor]) -> ModelPack:
    network = SonoNet16(input_scale=INPUT_SCALE)
    network.load_state_dict(state)
    return ModelPack(parsed_manifest(dict(manifest, ood=None)), [network], device="cpu")


def import_sononet(
    npz_path: Path,
    out_dir: Path,
    *,
    examples: str | Path | None = None,
    augmentations: int = OOD_AUGMENTATIONS,
    tpr: float = OOD_TPR,
    seed: int = 0,
) -> Path:
    """Convert the published SonoNet-16 npz into a model pack folder ``out_dir``.

    Writes ``weights.pt`` (the state dict of :class:`SonoNet16`), ``manifest.json``
    (``docs/MODEL_PACK.md``) and ``MODEL_CARD.md`` with
    :func:`workers.models.packs.write_pack` (atomic, sha256 filled in, validated).

    With ``examples`` (a folder of in-distribution frames, :func:`read_examples`), the pack
    gets an energy out-of-distribution detector whose threshold keeps ``tpr`` of those frames
    and ``augmentations`` augmented copies of each (:func:`fit_energy_threshold`); the
    manifest and model card say exactly what it was set on. Without, it has none.

    Raises
    ------
    FileNotFoundError
        If ``npz_path`` or the ``examples`` folder does not exist.
    ValueError
        If the npz does not hold SonoNet-16 weights, or no example frame is usable.
    """
    state = load_npz_state_dict(npz_path)
    ood: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}
    if examples is not None:
        frames = read_examples(examples)
        fit = fit_energy_threshold(
            _in_memory_pack(pack_manifest(), state),
            frames,
            tpr=tpr,
            augmentations=augmentations,
            seed=seed,
        )
        source = f"{Path(examples).name}/"
        ood = ood_manifest(fit, source)
        if fit.accuracy is not None and fit.augmented_accuracy is not None:
            metrics["example_frames"] = {
                "source": source,
                "n": fit.labelled,
                "accuracy": round(fit.accuracy, 4),
                "n_augmented": fit.labelled_augmented,
                "accuracy_augmented": round(fit.augmented_accuracy, 4),
                "note": "label from the file name; not a validation",
            }
        metrics["ood_energy_in_distribution"] = {
            "frames": fit.frames,
            "min": round(float(fit.energies.min()), 3),
            "median": round(float(np.median(fit.energies)), 3),
            "max": round(float(fit.energies.max()), 3),
        }
        logger.info(
            "energy OOD threshold %.3f at TPR %.2f on %d frames of %s",
            fit.threshold, tpr, fit.frames, examples,
        )
    manifest = pack_manifest(ood=ood, metrics=metrics)
    target = write_pack(
        out_dir, manifest, [state], extra_files={"MODEL_CARD.md": _model_card(manifest)}
    )
    logger.info("imported SonoNet-16 from %s into model pack %s", npz_path, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``sononode model import-sononet NPZ --out PACK_DIR``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sononode model import-sononet",
        description=(
            "Convert the published SonoNet-16 weights (npz) into a model pack, with an energy "
            "out-of-distribution threshold set on in-distribution example frames."
        ),
    )
    parser.add_argument("npz", type=Path, help="SonoNet16.npz from baumgach/SonoNet-weights")
    parser.add_argument("--out", type=Path, required=True, help="pack folder to write")
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        help=(
            "folder of in-distribution frames (TIFF/PNG/JPEG/DICOM; site data preferred) to set "
            f"the OOD threshold on (default: {EXAMPLES_FOLDER}/ beside the npz, if present)"
        ),
    )
    parser.add_argument("--no-ood", action="store_true", help="write no OOD detector")
    parser.add_argument(
        "--augmentations",
        type=int,
        default=OOD_AUGMENTATIONS,
        help=f"augmented copies per example frame (default {OOD_AUGMENTATIONS})",
    )
    parser.add_argument(
        "--tpr",
        type=float,
        default=OOD_TPR,
        help=f"fraction of in-distribution frames kept (default {OOD_TPR})",
    )
    args = parser.parse_args(argv)
    examples: Path | None = args.examples
    if examples is None and not args.no_ood and (args.npz.parent / EXAMPLES_FOLDER).is_dir():
        examples = args.npz.parent / EXAMPLES_FOLDER
    if args.no_ood:
        examples = None
    try:
        target = import_sononet(
            args.npz, args.out, examples=examples, augmentations=args.augmentations, tpr=args.tpr
        )
    except (OSError, ValueError) as exc:
        print(f"import-sononet: {exc}")
        return 1
    if examples is None:
        print("no example frames: the pack has no out-of-distribution detector")
    else:
        ood = json.loads((target / "manifest.json").read_text(encoding="utf-8"))["ood"]
        print(f"energy OOD threshold {ood['threshold']} ({ood['fitted_on']})")
    print(f"wrote model pack {target}")
    return 0
