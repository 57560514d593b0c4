"""Find the ultrasound image (the scan region) inside a frame, apart from the vendor's UI.

An ultrasound screen capture holds the image itself (a curvilinear or phased sector, or
a linear rectangle) surrounded by burned-in text, rulers, logos and grey or colour bars.
The models must only see the former. The header's Sequence of Ultrasound Regions gives
the tissue region's bounding rectangle when the modality writes it; the exact shape is
found by image analysis (:func:`region_from_image`), which is also the fallback when the
header has no regions.

No library ships an ultrasound scan-region detector, so the pipeline below is written
here; it is built only from scipy.ndimage filters and morphology, scipy.spatial's convex
hull and PIL's polygon fill.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from workers.imaging import UltrasoundRegion

logger = logging.getLogger(__name__)

#: Short side, in pixels, the frame is reduced to before analysis (speed; the UI's
#: text and the sector's outline survive this scale).
_WORK_SIDE = 240
#: Fraction of textured pixels (neighbour differences above the background's noise) in
#: a small window above which the window belongs to the image: speckle is textured nearly
#: everywhere, text only along its strokes.
_DENSE = 0.25
#: Density of textured pixels accepted when nothing was found at :data:`_DENSE`.
_SPARSE = 0.1
#: Radius of the opening that removes text, rulers, logos and bars, as a fraction of
#: the short side of the work image (the sector is far thicker than any of them).
_OPENING_FRACTION = 0.022
#: A region smaller than this fraction of the frame is not a scan region.
_MIN_AREA_FRACTION = 0.01


class RegionSource(StrEnum):
    """Where a scan region came from."""

    HEADER = "header"
    """The rectangle of the header's Sequence of Ultrasound Regions, used as is."""
    HEADER_REFINED = "header_refined"
    """The header's rectangle, narrowed to the sector found by image analysis inside it."""
    IMAGE = "image"
    """Image analysis alone (no usable header region)."""


@dataclass(frozen=True)
class ScanRegion:
    """The ultrasound image region of a frame.

    ``bbox`` is ``(column0, row0, column1, row1)`` with exclusive ends and ``mask`` a
    boolean ``(rows, columns)`` array, True inside the region.
    """

    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    source: RegionSource

    @property
    def width(self) -> int:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> int:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def grey_frames(frames: np.ndarray) -> np.ndarray:
    """``(N, rows, cols)`` float32 grey of ``(N, rows, cols, 3)`` (or grey) frames: channel mean."""
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4:
        # Channel by channel: far faster than a mean over a length-3 last axis.
        out = arr[..., 0].astype(np.float32)
        out += arr[..., 1]
        out += arr[..., 2]
        out *= np.float32(1.0 / 3.0)
        return out
    if arr.ndim == 3:
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"frames must be (N, rows, cols[, 3]), got shape {arr.shape}")


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(c0, r0, c1, r1)`` (exclusive ends) of a boolean mask, None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def find_scan_region(
    frames: np.ndarray,
    us_regions: Sequence[UltrasoundRegion] = (),
    *,
    grey: np.ndarray | None = None,
) -> ScanRegion | None:
    """Find the scan region of a frame or cine loop.

    Parameters
    ----------
    frames
        ``(N, rows, cols, 3)`` ``uint8`` RGB frames (or ``(rows, cols[, 3])`` one frame).
    us_regions
        The header's ultrasound regions, if any. The largest 2D tissue region is used as
        the rectangle and narrowed to the sector seen inside it.
    grey
        :func:`grey_frames` of ``frames`` if the caller has it already.

    Returns
    -------
    ScanRegion | None
        The region, or None when none can be found.
    """
    arr = np.asarray(frames)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3):
        arr = arr[None]
    if grey is None:
        grey = grey_frames(arr)
    shape = grey.shape[1:]
    rect = header_rectangle(us_regions, shape)
    if rect is not None:
        c0, r0, c1, r1 = rect
        inner = region_from_image(grey[:, r0:r1, c0:c1])
        rect_area = (c1 - c0) * (r1 - r0)
        mask = np.zeros(shape, dtype=bool)
        # A sector fills about half to all of its rectangle; much less means the analysis
        # latched on something else (or the probe is in air): trust the header then.
        if inner is not None and inner.area >= 0.3 * rect_area:
            mask[r0:r1, c0:c1] = _extend_to_depth(inner.mask)
            source = RegionSource.HEADER_REFINED
        else:
            mask[r0:r1, c0:c1] = True
            source = RegionSource.HEADER
        box = bbox_of(mask)
        assert box is not None
        return ScanRegion(box, mask, source)
    return region_from_image(grey)


def _extend_to_depth(mask: np.ndarray) -> np.ndarray:
    """Continue a sector found in the header's rectangle down to the rectangle's bottom.

    Deep echoes can be black (lung A-lines, shadowing), so the analysis may stop short;
    the header says how deep the image goes. The sector's sides are extrapolated as the
    straight lines fitted to the lower half of the part found.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size < 8 or rows[-1] >= mask.shape[0] - 2:
        return mask
    lower = rows[rows.size // 2 :]
    left = np.array([np.argmax(mask[r]) for r in lower], dtype=np.float64)
    right = np.array([mask.shape[1] - 1 - np.argmax(mask[r, ::-1]) for r in lower])
    fit_l = np.polyfit(lower, left, 1)
    fit_r = np.polyfit(lower, right.astype(np.float64), 1)
    out = mask.copy()
    cols = np.arange(mask.shape[1])
    for r in range(int(rows[-1]) + 1, mask.shape[0]):
        lo, hi = np.polyval(fit_l, r), np.polyval(fit_r, r)
        out[r] = (cols >= lo) & (cols <= hi)
    return out


def header_rectangle(
    us_regions: Sequence[UltrasoundRegion], shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """The largest 2D tissue region of the header as ``(c0, r0, c1, r1)``, clipped to ``shape``.

    Regions with Region Spatial Format 1 (2D) are preferred, tissue data type (1) first;
    regions without a spatial format are used only when no 2D one exists.
    """
    rows, cols = int(shape[0]), int(shape[1])

    def rank(reg: UltrasoundRegion) -> tuple[int, int, int]:
        area = (reg.max_x1 - reg.min_x0 + 1) * (reg.max_y1 - reg.min_y0 + 1)
        return (reg.spatial_format == 1, reg.data_type in (1, None), area)

    candidates = [r for r in us_regions if r.spatial_format in (1, None)]
    for reg in sorted(candidates, key=rank, reverse=True):
        c0, r0 = max(0, reg.min_x0), max(0, reg.min_y0)
        c1, r1 = min(cols, reg.max_x1 + 1), min(rows, reg.max_y1 + 1)
        if c1 - c0 >= 8 and r1 - r0 >= 8:
            return c0, r0, c1, r1
    return None


def _textured(g: np.ndarray, *, limit: int | None) -> np.ndarray:
    """Pixels that differ from their right or lower neighbour by more than ``limit`` in any
    of up to three frames, or that change over the loop (the UI is static, the live image
    moves). Neighbour differences, not a window, so the flat gap between text and the
    sector is kept."""
    n = g.shape[0]
    picks = sorted({0, n // 2, n - 1})
    if limit is None:
        # The background's own noise (lossy compression, video capture) sets the limit;
        # a flat background (most captures) gives 0, i.e. any change at all.
        dx0 = np.abs(np.diff(g[0, ::4].astype(np.int16), axis=1))
        flat = np.count_nonzero(dx0 == 0) >= 0.25 * dx0.size
        limit = 0 if flat else 2 * int(np.percentile(dx0, 25))
    feat = np.zeros(g.shape[1:], dtype=bool)
    for i in picks:
        frame = g[i].astype(np.int16)
        # Both directions: a pure gradient (shaded UI panels, grey bars) is not texture.
        both = np.abs(frame[:-1, 1:] - frame[:-1, :-1]) > limit
        both &= np.abs(frame[1:, :-1] - frame[:-1, :-1]) > limit
        feat[:-1, :-1] |= both
    if n >= 3:
        feat |= (g.max(axis=0).astype(np.int16) - g.min(axis=0)) > limit
    return feat


def _density(mask: np.ndarray, factor: int) -> np.ndarray:
    """Fraction of textured pixels per ``factor`` block, smoothed over 3x3 blocks."""
    rows, cols = mask.shape
    r, c = rows // factor * factor, cols // factor * factor
    counts = np.zeros((r // factor, c // factor), dtype=np.float32)
    for i in range(factor):
        for j in range(factor):
            counts += mask[i:r:factor, j:c:factor]
    return ndimage.uniform_filter(counts * np.float32(1.0 / factor**2), 3)


def _large_components(mask: np.ndarray, min_area: float) -> np.ndarray | None:
    """Components of at least a fifth of the largest (an anechoic gap or A-lines can cut
    the sector into bands), None if the largest is below ``min_area``."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    if sizes.max() < min_area:
        return None
    keep = sizes >= 0.2 * sizes.max()
    keep[0] = False
    return np.asarray(keep[labels])


def _bands_below(core: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Wide bands of texture below the core: A-lines or deep echoes cut off from it by black.

    Text blocks and logos are narrower than half the sector and beside or above it.
    """
    box = bbox_of(core)
    out = np.zeros_like(core)
    if box is None:
        return out
    c0, r0, c1, r1 = box
    width = c1 - c0
    work = (sparse & ~core).astype(np.uint8)
    sparse = ndimage.maximum_filter(ndimage.minimum_filter(work, 3), 3).astype(bool)
    labels, _ = ndimage.label(sparse)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        rs, cs = sl
        w = cs.stop - cs.start
        overlap = min(cs.stop, c1) - max(cs.start, c0)
        below = rs.start >= r0 + 0.25 * (r1 - r0)
        if below and w >= 0.5 * width and overlap >= 0.8 * min(w, width):
            out[sl] |= labels[sl] == i
    return out


def _hull_mask(component: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray | None:
    # Boundary pixels are enough for the hull; their corners make it cover whole pixels.
    edge = component & ~ndimage.binary_erosion(component)
    rr, cc = np.nonzero(edge)
    pts = np.concatenate(
        [np.stack([cc + dx, rr + dy], axis=1) for dx in (0.0, 1.0) for dy in (0.0, 1.0)]
    ).astype(np.float64)
    try:
        hull = ConvexHull(pts)
    except (QhullError, ValueError):
        return None
    # Back to full-resolution pixel-centre coordinates; draw the polygon there so the
    # outline is not blocky.
    verts = pts[hull.vertices] * factor - 0.5
    img = Image.new("1", (shape[1], shape[0]), 0)
    ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in verts], fill=1)
    return np.asarray(img, dtype=bool)


def region_from_image(grey: np.ndarray) -> ScanRegion | None:
    """Find the scan region by image analysis alone.

    The ultrasound image is the one large textured (speckled, noisy or moving) area of
    the frame; text, rulers, logos and bars are thin or small, flat UI panels and the
    background have no texture. Steps: local standard deviation (and temporal standard
    deviation for loops) above a small limit, an opening with a disk a little wider than
    a text line (removes the UI), the largest connected component, hole filling and its
    convex hull (sectors and rectangles are convex, which also restores dark anechoic
    areas at their edge).

    Parameters
    ----------
    grey
        ``(N, rows, cols)`` or ``(rows, cols)`` grey frames, 0-255.

    Returns
    -------
    ScanRegion | None
        The region (``source`` IMAGE), or None if nothing large enough was found.
    """
    g = np.asarray(grey)
    if g.ndim == 2:
        g = g[None]
    if g.dtype != np.uint8:
        g = np.clip(np.rint(g), 0, 255).astype(np.uint8)
    rows, cols = g.shape[1:]
    if min(rows, cols) < 16:
        return None
    factor = max(1, round(min(rows, cols) / _WORK_SIDE))
    work_shape = (rows // factor, cols // factor)
    size = 2 * max(2, round(_OPENING_FRACTION * min(work_shape))) + 1
    min_area = _MIN_AREA_FRACTION * work_shape[0] * work_shape[1]
    comp = None
    # Speckle is textured almost everywhere, text and UI graphics only along their thin
    # strokes. The fallback accepts sparse texture (faint noise of a probe in air).
    for limit, level in ((None, _DENSE), (0, _SPARSE)):
        density = _density(_textured(g, limit=limit), factor)
        work = (density >= level).astype(np.uint8)
        # Opening with a square (separable, so fast): removes all that is thinner than
        # the square: text, rulers, bars, logos, caliper arms, panel outlines.
        work = ndimage.maximum_filter(ndimage.minimum_filter(work, size), size)
        comp = _large_components(work.astype(bool), min_area)
        if comp is not None:
            comp |= _bands_below(comp, density >= _SPARSE)
            break
    if comp is None:
        return None
    mask = _hull_mask(comp, factor, (rows, cols))
    if mask is None or not mask.any():
        return None
    box = bbox_of(mask)
    assert box is not None
    return ScanRegion(box, mask, RegionSource.IMAGE)
