"""Fit a pack's image-statistics OOD score and store it in the pack.

The statistics (:mod:`workers.models.image_statistics`) of the training frames give the
Gaussian; the threshold is a quantile of the distances of *other* studies' frames (the
calibration split, or a held-out part of the studies given), so that the share of
in-distribution frames it rejects is measured on frames it was not fitted on. Figures of
how well it separates an unseen vendor come from ``bench/ood.py`` on fresh frames.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkit.data import FrameSet
from modelkit.pack_writer import IMAGE_OOD_FILE
from workers.models.image_statistics import POOLED, ImageStatisticsScorer
from workers.models.manifest import Manifest, sha256_file
from workers.models.nets import VIEW_LABELS

#: Share of held-out in-distribution frames the threshold keeps, by default.
DEFAULT_TPR = 0.95


@dataclass(frozen=True)
class ImageOODFit:
    """A fitted scorer, its threshold and what the threshold rests on."""

    scorer: ImageStatisticsScorer
    threshold: float
    tpr: float
    fit_frames: int
    threshold_frames: int

    def manifest_block(self) -> dict[str, Any]:
        """The ``ood.image`` block (the writer adds the file name and its sha256)."""
        return {"threshold": round(self.threshold, 4), "tpr": self.tpr,
                "frames": self.threshold_frames, "fit_frames": self.fit_frames,
                "conditioned_on": "predicted view",
                "classes": [c for c in self.scorer.classes if c != POOLED],
                "statistics": "workers.models.image_statistics.STATISTICS"}


def _statistics(frames: FrameSet, what: str) -> np.ndarray:
    if frames.image_statistics is None:
        raise ValueError(f"the {what} frames carry no image statistics")
    return frames.image_statistics.numpy().astype(np.float64)


def _views(frames: FrameSet, names: Sequence[str]) -> list[str]:
    """Each frame's labelled view (``POOLED`` where it has none)."""
    labels = frames.labels.get("view")
    if labels is None:
        return [POOLED] * len(frames)
    return [names[i] if 0 <= i < len(names) else POOLED for i in labels.tolist()]


def fit_image_ood(fit: FrameSet, held_out: FrameSet, *, tpr: float = DEFAULT_TPR,
                  view_names: Sequence[str] = VIEW_LABELS) -> ImageOODFit:
    """Fit on ``fit``'s frames, one Gaussian per labelled view; the threshold keeps ``tpr``
    of ``held_out``'s frames (other studies of the same vendors), each scored against its
    labelled view (at inference the node takes the predicted one)."""
    if not 0.5 <= tpr < 1.0:
        raise ValueError(f"tpr must be within [0.5, 1), got {tpr}")
    fitting, thresholding = _statistics(fit, "fitting"), _statistics(held_out, "held-out")
    # Never set the threshold on frames the Gaussians were fitted on: a frame's statistics
    # are its fingerprint (identical rows are the same crop).
    fitted = {row.tobytes() for row in fitting}
    if any(row.tobytes() in fitted for row in thresholding):
        raise ValueError("the held-out frames include frames the statistics were fitted on: "
                         "set the threshold on other studies")
    scorer = ImageStatisticsScorer.fit(fitting, _views(fit, view_names))
    distances = scorer.score(thresholding, _views(held_out, view_names))
    if distances.size < 20:
        raise ValueError(f"a threshold needs at least 20 held-out frames, got {distances.size}")
    return ImageOODFit(scorer, float(np.quantile(distances, tpr)), tpr, len(fit), len(held_out))


def write_image_ood(folder: Path, fit: ImageOODFit, *, version: str | None = None) -> Path:
    """Store ``fit`` in the pack in ``folder`` (beside its embedding score) and name it in
    the manifest, optionally under a new ``version``. The pack must have an ``ood`` block."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("ood"):
        raise ValueError(f"{folder}: the pack has no OOD detector to add image statistics to")
    path = folder / IMAGE_OOD_FILE
    fit.scorer.save(path)
    manifest["ood"]["image"] = {"stats": IMAGE_OOD_FILE, "sha256": sha256_file(path),
                                **fit.manifest_block()}
    if version is not None:
        manifest["version"] = version
    Manifest.from_dict(manifest)  # refuse to leave an invalid manifest behind
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path
