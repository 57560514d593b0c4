"""Image statistics of a model input crop, and how far they are from the training images'.

The network's embedding is trained to ignore much of what tells one scanner from another
(grey map, speckle size, speckle reduction), so a Mahalanobis distance on it separates an
unseen vendor's images from the training vendors' only weakly (AUROC 0.66-0.73 on the
simulator's held-out vendor, ``bench/ood.py``). The images themselves differ plainly:
their grey-level distribution and their texture, measured here on the crop at the
resolution the node received it (before the resize to the network input, which blurs
speckle away). :class:`ImageStatisticsScorer` is the Mahalanobis distance of these
statistics to those of the training frames; a pack carries it beside its embedding
detector (``ood.image`` in the manifest) and an image is out of distribution when either
score is above its threshold.

Written by hand: a dozen numpy/scipy lines per statistic; scikit-image's texture
descriptors (grey-level co-occurrence) would cost far more per frame and measure the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from workers.models.ood import shrunk_gaussian

#: Names of the statistics, in the order of :func:`image_statistics`' vector.
STATISTICS: tuple[str, ...] = (
    "grey_q05", "grey_q25", "grey_q50", "grey_q75", "grey_q95", "grey_sd",
    "laplacian_1", "gradient_x_1", "gradient_y_1",
    "laplacian_2", "gradient_x_2", "gradient_y_2",
)
#: Grey level (of ``[0, 1]``) above which a pixel counts as image, not background: the crop
#: is zero outside the scan region's mask.
FOREGROUND = 0.02
#: Pixels trimmed from the foreground's edge before texture is measured, so that the
#: statistic is the image's texture and not the outline of its sector.
EDGE = 3
_MIN_PIXELS = 64


def _texture(x: np.ndarray, inner: np.ndarray, sd: float) -> list[float]:
    """Laplacian and gradient energy inside ``inner``, relative to the grey-level spread:
    high for fine speckle, low for smoothed or coarse speckle (log scale)."""
    core = inner[1:-1, 1:-1]
    c = x[1:-1, 1:-1]
    lap = (x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * c)[core]
    gx = np.abs(x[1:-1, 2:] - c)[core]
    gy = np.abs(x[2:, 1:-1] - c)[core]
    values = [float(lap.std()), float(gx.mean()), float(gy.mean())] if lap.size else [0.0] * 3
    return [float(np.log(v / sd + 1e-6)) for v in values]


def _half(x: np.ndarray) -> np.ndarray:
    """2 x 2 block means (odd last row/column dropped)."""
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    return np.asarray((x[0:h:2, 0:w:2] + x[1:h:2, 0:w:2] + x[0:h:2, 1:w:2]
                       + x[1:h:2, 1:w:2]) * 0.25)


def _half_all(mask: np.ndarray) -> np.ndarray:
    """2 x 2 blocks all of whose pixels are in ``mask``."""
    h, w = (mask.shape[0] // 2) * 2, (mask.shape[1] // 2) * 2
    return np.asarray(mask[0:h:2, 0:w:2] & mask[1:h:2, 0:w:2] & mask[0:h:2, 1:w:2]
                      & mask[1:h:2, 1:w:2])


#: Bins of the grey-level histogram the quantiles are read from (a quantile is exact to
#: half a bin, 1/2048: the pixels themselves have 8-bit steps of 1/255).
_BINS = 1024


def image_statistics(crop: np.ndarray) -> np.ndarray:
    """The :data:`STATISTICS` of one grey crop in ``[0, 1]`` (the node's model input before
    resizing: :func:`workers.models.preprocess.model_input`), ``(12,)`` float64.

    Grey levels: quantiles and standard deviation of the foreground pixels. Texture at the
    received resolution and at half of it: Laplacian and horizontal/vertical gradient
    energy of the foreground's interior, over the grey-level standard deviation, in logs.
    """
    x = np.asarray(crop, np.float32)
    if x.ndim == 3:
        x = x.mean(axis=-1)
    if x.ndim != 2 or min(x.shape) < 8:
        raise ValueError(f"image statistics need a 2-D grey crop, got shape {x.shape}")
    mask = x > FOREGROUND
    if int(mask.sum()) < _MIN_PIXELS:
        mask = np.ones_like(mask)
    v = x[mask]
    sd = float(v.std()) + 1e-6
    counts = np.bincount(np.clip((v * _BINS).astype(np.int64), 0, _BINS - 1), minlength=_BINS)
    cumulative = np.cumsum(counts) / v.size
    grey = [float((np.searchsorted(cumulative, q) + 0.5) / _BINS)
            for q in (0.05, 0.25, 0.5, 0.75, 0.95)] + [sd]
    inner = ndimage.minimum_filter(mask.view(np.uint8), size=2 * EDGE + 1).astype(bool)
    if int(inner.sum()) < _MIN_PIXELS:
        inner = mask
    x2 = _half(x)
    inner2 = _half_all(inner)
    if int(inner2.sum()) < _MIN_PIXELS // 4:
        inner2 = np.ones_like(inner2)
    return np.asarray(grey + _texture(x, inner, sd) + _texture(x2, inner2, sd), np.float64)


#: Name of the Gaussian of all training frames (used for a class with too few frames).
POOLED = "*"


class ImageStatisticsScorer:
    """Mahalanobis distance of :func:`image_statistics` to those of the training frames of
    the image's class (the view the pack predicts: a lung and a thyroid image differ in
    texture more than two scanners do), or of all training frames for a class with too few
    (class-conditional Gaussians, as Lee et al., NeurIPS 2018, on a network's features)."""

    def __init__(self, means: np.ndarray, precisions: np.ndarray,
                 classes: tuple[str, ...]) -> None:
        k = len(STATISTICS)
        if (means.ndim != 2 or means.shape[1:] != (k,) or precisions.shape != (len(means), k, k)
                or len(classes) != len(means) or classes[:1] != (POOLED,)):
            raise ValueError(f"image statistics: means (C, {k}) and precisions (C, {k}, {k}) "
                             f"for classes starting with {POOLED!r} expected, got "
                             f"{means.shape}, {precisions.shape} and {classes}")
        self.means = means.astype(np.float64)
        self.precisions = precisions.astype(np.float64)
        self.classes = tuple(classes)

    @classmethod
    def fit(cls, statistics: np.ndarray, classes: np.ndarray | list[str] | None = None, *,
            shrinkage: float = 0.1) -> ImageStatisticsScorer:
        """A Gaussian (covariance shrunk towards its diagonal scale by ``shrinkage``) of all
        frames, and one per class of ``classes`` (one name per frame) with at least
        ``2 x 12`` frames."""
        x = np.asarray(statistics, np.float64)
        minimum = 2 * len(STATISTICS)
        if x.ndim != 2 or x.shape[1] != len(STATISTICS) or x.shape[0] < minimum:
            raise ValueError(f"fitting needs (N >= {minimum}, {len(STATISTICS)}) statistics, "
                             f"got {x.shape}")
        names, means, precisions = [POOLED], [], []
        mean, precision = shrunk_gaussian(x, shrinkage)
        means.append(mean)
        precisions.append(precision)
        if classes is not None:
            labels = np.asarray(classes, dtype=str)
            if labels.shape != (x.shape[0],):
                raise ValueError("one class per frame expected")
            for name in sorted(set(labels.tolist()) - {POOLED}):
                rows = x[labels == name]
                if rows.shape[0] >= minimum:
                    mean, precision = shrunk_gaussian(rows, shrinkage)
                    names.append(name)
                    means.append(mean)
                    precisions.append(precision)
        return cls(np.stack(means), np.stack(precisions), tuple(names))

    def score(self, statistics: np.ndarray, classes: list[str] | None = None) -> np.ndarray:
        """Distances ``(N,)`` of ``(N, 12)`` statistics, each to its class's Gaussian."""
        x = np.asarray(statistics, np.float64).reshape(-1, len(STATISTICS))
        index = np.zeros(x.shape[0], np.int64)
        if classes is not None:
            if len(classes) != x.shape[0]:
                raise ValueError("one class per row expected")
            where = {name: i for i, name in enumerate(self.classes)}
            index = np.asarray([where.get(str(c), 0) for c in classes], np.int64)
        d = x - self.means[index]
        squared: np.ndarray = np.einsum("nd,nde,ne->n", d, self.precisions[index], d)
        return np.sqrt(np.maximum(squared, 0.0))

    def score_crops(self, crops: list[np.ndarray], classes: list[str] | None = None
                    ) -> np.ndarray:
        return self.score(np.stack([image_statistics(c) for c in crops]), classes)

    def save(self, path: Path) -> None:
        np.savez(path, means=self.means, precisions=self.precisions,
                 classes=np.asarray(self.classes), statistics=np.asarray(STATISTICS))

    @classmethod
    def load(cls, path: Path) -> ImageStatisticsScorer:
        with np.load(path) as data:
            names = tuple(str(s) for s in data["statistics"])
            if names != STATISTICS:
                raise ValueError(f"image statistics {names} are not this node's {STATISTICS}")
            return cls(data["means"], data["precisions"],
                       tuple(str(c) for c in data["classes"]))
