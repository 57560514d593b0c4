"""Find the ultrasound image (the scan region) inside a frame, apart from the vendor's UI.

An ultrasound screen capture holds the image itself (a curvilinear or phased sector, or
a linear rectangle) surrounded by burned-in text, rulers, logos and grey or colour bars.
The models must only see the former. The header's Sequence of Ultrasound Regions gives
the tissue region's bounding rectangle when the modality writes it; the exact shape is
found by image analysis (:func:`region_from_image`), which is also the fallback when the
header has no regions.

Image analysis finds the large textured area of the frame, then fits the geometry of a
probe to it: two straight sides (meeting at the sector's apex, or parallel for a linear
probe) and two arcs centred on the apex (or two rows). The fit uses only the outermost
textured pixels, so dark parts of the image (lung below the pleura, A-line gaps, acoustic
shadows) that reach the sector's edge do not cut into the region, as they do into a
convex hull. Where no probe geometry fits (zoomed images clipped by the frame, odd
shapes), the convex hull of the textured area is the region.

This is the node's one scan-region detector: QC runs it once per instance, and the models
see QC's region and mask (:mod:`workers.models.preprocess`), in serving and in training.
No library ships an ultrasound scan-region detector, so the pipeline below is written
here; it is built only from scipy.ndimage filters and morphology, scipy.spatial's convex
hull and PIL's polygon fill.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from workers.imaging.pixels import grey_frames
from workers.imaging.types import UltrasoundRegion

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
#: Side slopes (columns per row) below which a side is vertical (linear probe) ...
_VERTICAL_SLOPE = 0.03
#: ... and above which it is a sector's side (about 3 degrees off vertical).
_SECTOR_SLOPE = 0.05
#: Fraction of the textured area's rows that must lie on a fitted side.
_MIN_SIDE_SUPPORT = 0.08
#: Fraction of the textured area (less its rim) the fitted geometry must contain.
_MIN_CONTAINED = 0.98
#: Rays (sector) or columns (rectangle) sampled to place the top and bottom edges.
_EDGE_SAMPLES = 64


class RegionSource(StrEnum):
    """Where a scan region came from."""

    HEADER = "header"
    """The rectangle of the header's Sequence of Ultrasound Regions, used as is."""
    HEADER_REFINED = "header_refined"
    """The header's rectangle, narrowed to the sector found by image analysis inside it."""
    IMAGE = "image"
    """Image analysis alone (no usable header region)."""


class RegionShape(StrEnum):
    """The geometry of a scan region."""

    SECTOR = "sector"
    """Curvilinear or phased sector: straight sides meeting at an apex, arcs about it."""
    RECTANGLE = "rectangle"
    """Linear probe: parallel vertical sides, flat top and bottom."""
    OTHER = "other"
    """No probe geometry fitted: the convex hull of the image area (or the header's
    rectangle as is)."""


@dataclass(frozen=True)
class ScanRegion:
    """The ultrasound image region of a frame.

    ``bbox`` is ``(column0, row0, column1, row1)`` with exclusive ends and ``mask`` a
    boolean ``(rows, columns)`` array, True inside the region.
    """

    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    source: RegionSource
    shape: RegionShape = RegionShape.OTHER

    @property
    def width(self) -> int:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> int:
        return self.bbox[3] - self.bbox[1]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


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
        the rectangle: the image analysis looks only inside it, and it gives the depth
        of a sector whose deep part is black.
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
    if rect is None:
        return region_from_image(grey)
    c0, r0, c1, r1 = rect
    rect_area = (c1 - c0) * (r1 - r0)
    inner = region_from_image(grey, within=rect)
    if inner is not None and inner.shape is RegionShape.SECTOR:
        return ScanRegion(inner.bbox, inner.mask, RegionSource.HEADER_REFINED, inner.shape)
    if inner is not None and inner.shape is RegionShape.RECTANGLE:
        # A linear probe's image: the header's rectangle, unless it has margins around it.
        if inner.area >= 0.97 * rect_area:
            return _rectangle_region(rect, shape, RegionSource.HEADER)
        return ScanRegion(inner.bbox, inner.mask, RegionSource.HEADER_REFINED, inner.shape)
    # No sector fitted to the texture (blurred or dark image, linear probe): the shape
    # inscribed in the rectangle that best matches the pixels that are not background.
    inscribed = _inscribed_region(grey, rect)
    if inscribed is not None:
        return inscribed
    # A sector fills about half to all of its rectangle; much less means the analysis
    # latched on something else (or the probe is in air): trust the header then.
    if inner is not None and inner.shape is RegionShape.OTHER and inner.area >= 0.3 * rect_area:
        return ScanRegion(inner.bbox, inner.mask, RegionSource.HEADER_REFINED, inner.shape)
    return _rectangle_region(rect, shape, RegionSource.HEADER)


def _rectangle_region(
    rect: tuple[int, int, int, int], shape: tuple[int, ...], source: RegionSource
) -> ScanRegion:
    c0, r0, c1, r1 = rect
    mask = np.zeros(shape[:2], dtype=bool)
    mask[r0:r1, c0:c1] = True
    return ScanRegion(rect, mask, source, RegionShape.RECTANGLE)


def _inscribed_region(grey: np.ndarray, rect: tuple[int, int, int, int]) -> ScanRegion | None:
    """The header's rectangle or the symmetric sector inscribed in it (apex above its
    centre, bottom arc touching its bottom edge, bottom corners on its sides, top arc
    ending on its top edge) whose pixels best match (IoU) those that differ from the
    background; None when nothing matches well (a blank or nearly blank image)."""
    c0, r0, c1, r1 = rect
    rows, cols = grey.shape[1:]
    step = max(1, round(min(rows, cols) / _WORK_SIDE))
    g = grey[:, r0:r1:step, c0:c1:step]
    outside = np.ones((rows, cols), dtype=bool)
    outside[r0:r1, c0:c1] = False
    rest = grey[0][outside]
    background = float(np.median(rest[:: max(1, rest.size // 20000)])) if rest.size >= 64 else 0.0
    signal = (np.abs(g - np.float32(background)) > 4).any(axis=0)
    if signal.mean() < 0.05:
        return None
    yy = (r0 + np.arange(g.shape[1]) * step)[:, None].astype(np.float64)
    xx = (c0 + np.arange(g.shape[2]) * step)[None, :].astype(np.float64)
    xc, half, height = (c0 + c1 - 1) / 2, (c1 - c0) / 2, float(r1 - r0)
    total = int(np.count_nonzero(signal))
    best_iou, best, best_recall = float(total) / signal.size, None, 1.0  # the rectangle
    lo = max(0.0, half / math.sin(math.radians(85)) - height)
    hi = half / math.sin(math.radians(10)) - height
    for d in np.geomspace(lo + 1.0, max(hi, lo + 2.0), 48) - 1.0:
        far = height + d  # apex d rows above the top, bottom arc on the bottom edge
        theta = math.asin(min(1.0, half / far))
        near = d / math.cos(theta)
        dist = np.hypot(xx - xc, yy - (r0 - d))
        inside = (dist >= near) & (dist <= far) & (np.abs(xx - xc) <= np.tan(theta) * (yy - r0 + d))
        both = int(np.count_nonzero(inside & signal))
        iou = both / max(total + int(np.count_nonzero(inside)) - both, 1)
        if iou > best_iou:
            best_iou, best, best_recall = iou, (d, theta, near, far), both / total
    # Dark parts of the image (black lung, shadows) lower the IoU of the right shape too,
    # but it must hold nearly all the signal.
    if best_iou < 0.25 or best_recall < 0.9:
        return None
    if best is None:
        return _rectangle_region(rect, (rows, cols), RegionSource.HEADER)
    d, theta, near, far = best
    apex = (xc, r0 - d)
    t = math.tan(theta)
    left = _Side(xc + t * apex[1], -t, 0)
    right = _Side(xc - t * apex[1], t, 0)
    mask = _geometry_mask(_Geometry(RegionShape.SECTOR, left, right, apex, near, far), (rows, cols))
    clip = np.zeros_like(mask)
    clip[r0:r1, c0:c1] = True
    mask &= clip
    box = bbox_of(mask)
    if box is None:
        return None
    return ScanRegion(box, mask, RegionSource.HEADER_REFINED, RegionShape.SECTOR)


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
    density: np.ndarray = ndimage.uniform_filter(counts * np.float32(1.0 / factor**2), 3)
    return density


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


def _faint_area(
    g: np.ndarray, factor: int, size: int, min_area: float, allowed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The pixels that differ from the background (the most common grey level of the
    frame's border) and the large areas of them that are not flat: a faint sector of
    noise (probe in air, gain at its lowest) rather than a uniform UI panel."""
    frame = g[0]
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    background = int(np.bincount(border, minlength=256).argmax())
    feat = (g != background).any(axis=0)
    density = _density(feat, factor)
    if allowed is not None:
        density[~allowed] = 0.0
    work = (density >= 0.5).astype(np.uint8)
    work = ndimage.maximum_filter(ndimage.minimum_filter(work, size), size)
    comp = _large_components(work.astype(bool), min_area)
    if comp is None:
        return feat, None
    labels, count = ndimage.label(comp)
    small = frame[::factor, ::factor][: comp.shape[0], : comp.shape[1]]
    for i in range(1, count + 1):
        values = small[labels == i]
        # A panel is one grey (with some text on it); noise spreads over several.
        if np.bincount(values).max() >= 0.7 * values.size:
            comp[labels == i] = False
    return feat, comp if comp.any() else None


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


# ------------------------------------------------------------------------------------
# Probe geometry. Coordinates are full-resolution pixel centres (column x, row y); a
# side is the line x = a + b * y on the boundary between outside and inside pixels.
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    a: float
    b: float
    support: int
    """Rows whose outermost textured pixel lies on the line."""

    def x(self, y: np.ndarray | float) -> np.ndarray | float:
        return self.a + self.b * y


@dataclass(frozen=True)
class _Geometry:
    shape: RegionShape
    left: _Side
    right: _Side
    apex: tuple[float, float]
    """Sector apex ``(x, y)``, where the sides meet (unused for rectangles)."""
    near: float
    """Sector: radius of the top arc; rectangle: the top boundary row."""
    far: float
    """Sector: radius of the bottom arc; rectangle: the bottom boundary row."""


def _envelopes(
    y: np.ndarray, u: np.ndarray, tol: float, need: float
) -> list[tuple[float, float, int]]:
    """Lines ``u = c0 + c1 * y`` above every point that pass within ``tol`` of at least
    ``need`` of them, most supported first (at most three).

    ``u`` grows outward (minus the column for a left side), so dark image parts that reach
    the edge only move points inward, below the line: the candidates are the edges of the
    upper convex hull, refitted by least squares to the points on them. The longest one is
    not always the side (B-lines in lung make long straight inner edges).
    """
    if y.size < 3:
        return []
    hull: list[int] = []
    for i in range(y.size):  # Andrew's monotone chain (y is increasing), upper part
        while len(hull) >= 2:
            o, p = hull[-2], hull[-1]
            cross = (y[p] - y[o]) * (u[i] - u[o]) - (u[p] - u[o]) * (y[i] - y[o])
            if cross < 0:
                break
            hull.pop()
        hull.append(i)
    found: list[tuple[int, np.ndarray]] = []
    for p, q in itertools.pairwise(hull):
        slope = (u[q] - u[p]) / (y[q] - y[p])
        on = (u[p] + slope * (y - y[p])) - u <= tol
        count = int(np.count_nonzero(on))
        if count >= max(need, 3):
            found.append((count, on))
    found.sort(key=lambda item: -item[0])
    out: list[tuple[float, float, int]] = []
    for count, on in found[:3]:
        c1, c0 = np.polyfit(y[on], u[on], 1)
        out.append((float(c0), float(c1), count))
    return out


def _hits(
    feat: np.ndarray, ys: np.ndarray, xs: np.ndarray, *, last: bool, open_end: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Along each row of the ``(K, M)`` sample positions, the first (or ``last``) textured
    sample: its position ``(y, x)`` and whether it is a clean edge (found, and, with
    ``open_end``, not on the band's outer end, where the image may go on beyond it)."""
    h, w = feat.shape
    yi = np.rint(ys).astype(np.intp)
    xi = np.rint(xs).astype(np.intp)
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    vals = np.zeros(yi.shape, dtype=bool)
    vals[inside] = feat[yi[inside], xi[inside]]
    if last:
        vals = vals[:, ::-1]
    k = vals.argmax(axis=1)
    ok = np.asarray(vals.any(axis=1))
    if open_end:
        ok &= k > 0
    if last:
        k = vals.shape[1] - 1 - k
    rows = np.arange(yi.shape[0])
    return np.stack([yi[rows, k], xi[rows, k]], axis=1).astype(np.float64), ok


def _side_candidates(comp: np.ndarray, factor: int) -> tuple[list[_Side], list[_Side]]:
    """Candidate left and right sides of the work-scale area, from its outermost pixel
    per row, in full-resolution coordinates."""
    f = factor
    rows = np.flatnonzero(comp.any(axis=1))
    if rows.size < 8:
        return [], []
    sub = comp[rows]
    left = sub.argmax(axis=1)
    right = comp.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    y = (rows + 0.5) * f - 0.5
    tol = 0.75 * f + 0.5  # a line's outermost pixels zigzag by one work pixel
    need = max(6.0, _MIN_SIDE_SUPPORT * rows.size)
    lefts = [_Side(-c0, -c1, n * f) for c0, c1, n in _envelopes(y, -(left * f - 0.5), tol, need)]
    rights = [_Side(c0, c1, n * f) for c0, c1, n in _envelopes(y, (right + 1) * f - 0.5, tol, need)]
    return lefts, rights


def _refine_side(feat: np.ndarray, side: _Side, y0: float, y1: float, *, left: bool) -> _Side:
    """The side refitted to the full-resolution outermost textured pixels near it."""
    h = feat.shape[0]
    ys = np.arange(max(0, math.ceil(y0)), min(h, math.floor(y1) + 1), dtype=np.float64)
    if ys.size < 8:
        return side
    band = 6
    offsets = np.arange(-band, band + 1, dtype=np.float64)
    if not left:
        offsets = offsets[::-1]
    xs = np.rint(np.asarray(side.x(ys)))[:, None] + offsets[None, :]
    pos, ok = _hits(feat, np.repeat(ys[:, None], offsets.size, axis=1), xs, last=False)
    if np.count_nonzero(ok) < 8:
        return side
    u = -(pos[ok, 1] - 0.5) if left else pos[ok, 1] + 0.5
    fits = _envelopes(pos[ok, 0], u, 1.0, max(8.0, 0.5 * side.support, 0.25 * ys.size))
    # Keep the coarse side unless enough rows agree (dark edges leave few hits).
    if not fits:
        return side
    c0, c1, count = fits[0]
    new = _Side(-c0, -c1, count) if left else _Side(c0, c1, count)
    if max(abs(float(new.x(v)) - float(side.x(v))) for v in (y0, y1)) > band:
        return side
    return new


def _radial_edges(
    feat: np.ndarray,
    apex: tuple[float, float],
    angles: np.ndarray,
    radii: np.ndarray,
    *,
    last: bool,
    open_end: bool = True,
) -> np.ndarray:
    """Radius of the first (``last``: final) textured pixel along each ray; NaN where none
    (or, with ``open_end``, where the texture goes on past the band's outer end)."""
    x0, y0 = apex
    ys = y0 + radii[None, :] * np.cos(angles)[:, None]
    xs = x0 + radii[None, :] * np.sin(angles)[:, None]
    pos, ok = _hits(feat, ys, xs, last=last, open_end=open_end)
    r = np.hypot(pos[:, 1] - x0, pos[:, 0] - y0)
    return np.where(ok, r, np.nan)


@dataclass(frozen=True)
class _Area:
    """The textured area being fitted: work-scale mask and its pixel centres at full scale."""

    comp: np.ndarray
    feat: np.ndarray
    factor: int
    xs: np.ndarray
    ys: np.ndarray

    @property
    def top(self) -> float:
        return float(self.ys.min()) - self.factor / 2

    @property
    def bottom(self) -> float:
        return float(self.ys.max()) + self.factor / 2


def _rectangle(area: _Area, left: _Side, right: _Side, bottom: float | None) -> _Geometry | None:
    """A linear probe's rectangle between two vertical sides."""
    f, feat = area.factor, area.feat
    top_row, bottom_row = area.top, area.bottom
    left = _refine_side(feat, left, top_row + 2 * f, bottom_row - 2 * f, left=True)
    right = _refine_side(feat, right, top_row + 2 * f, bottom_row - 2 * f, left=False)
    # Top and bottom rows from columns spread between the sides, to the pixel.
    cols = np.linspace(
        float(left.x(top_row)) + 2 * f, float(right.x(top_row)) - 2 * f, _EDGE_SAMPLES
    )
    span = np.arange(-4 * f - 4, 4 * f + 5, dtype=np.float64)
    xs = np.repeat(cols[:, None], span.size, axis=1)
    pos, ok = _hits(feat, np.broadcast_to(top_row + span, xs.shape), xs, last=False)
    if ok.sum() < 8:
        return None
    near = float(np.median(pos[ok, 0])) - 0.5
    if np.count_nonzero(np.abs(pos[ok, 0] - 0.5 - near) <= 2.0) < 0.5 * _EDGE_SAMPLES:
        return None  # no straight top edge (a clipped or zoomed image)
    if bottom is None:
        pos, ok = _hits(feat, np.broadcast_to(bottom_row + span, xs.shape), xs, last=True)
        far = float(np.median(pos[ok, 0])) + 0.5 if ok.sum() >= 8 else bottom_row
    else:
        far = bottom  # as for a sector's bottom arc
    return _Geometry(RegionShape.RECTANGLE, left, right, (0.0, 0.0), near, far)


def _apex(left: _Side, right: _Side) -> tuple[float, float]:
    y = (right.a - left.a) / (left.b - right.b)
    return float(left.x(y)), float(y)


def _sector(area: _Area, left: _Side, right: _Side, bottom: float | None) -> _Geometry | None:
    """A curvilinear or phased sector between two converging sides, arcs about their apex."""
    f, feat = area.factor, area.feat
    if left.b > -_SECTOR_SLOPE or right.b < _SECTOR_SLOPE:
        return None
    if abs(left.b + right.b) / 2 > 0.1 * (right.b - left.b) + 0.02:
        return None  # sectors are symmetric about the vertical; this is something else
    apex = _apex(left, right)
    if apex[1] > area.top + f:
        return None
    # Radii of the area's pixels per direction: the top arc is the nearest, the bottom arc
    # the farthest (texture never goes past it but often stops short of it: black deep
    # lung, shadows).
    r = np.hypot(area.xs - apex[0], area.ys - apex[1])
    phi = np.arctan2(area.xs - apex[0], area.ys - apex[1])
    phi_l, phi_r = math.atan(left.b), math.atan(right.b)
    bins = np.clip(((phi - phi_l) / (phi_r - phi_l) * 32).astype(np.intp), 0, 31)
    lo = np.full(32, np.inf)
    hi = np.full(32, -np.inf)
    np.minimum.at(lo, bins, r)
    np.maximum.at(hi, bins, r)
    seen = np.isfinite(lo)
    if seen.sum() < 8:
        return None
    near = float(np.median(lo[seen])) - f / 2
    far = float(hi[seen].max()) + f / 2
    # The sides, refined between the top arc's ends and the bottom arc's (straight there).
    y_from = apex[1] + max(near, 0.0) * math.cos(phi_l) + 2 * f
    left = _refine_side(feat, left, y_from, apex[1] + far * math.cos(phi_l) - 2 * f, left=True)
    right = _refine_side(feat, right, y_from, apex[1] + far * math.cos(phi_r) - 2 * f, left=False)
    if left.b - right.b > -1e-6:
        return None
    apex = _apex(left, right)
    phi_l, phi_r = math.atan(left.b), math.atan(right.b)
    span = phi_r - phi_l
    if not math.radians(15) <= span <= math.radians(170):
        return None
    angles = np.linspace(phi_l + 0.1 * span, phi_r - 0.1 * span, _EDGE_SAMPLES)
    band = 4 * f + 4
    # The opening cut the narrow tip of a phased sector: search from the apex then, where
    # a hit on the first sample is the edge itself.
    start = max(0.0, near - 2 * band)
    inner = _radial_edges(
        feat, apex, angles, np.arange(start, near + band, 1.0), last=False, open_end=start > 0
    )
    if np.count_nonzero(~np.isnan(inner)) >= 8:
        near = max(0.0, float(np.nanmedian(inner)) - 0.5)
    # The top arc must be seen: an image cut flat at the top by the display (a zoomed
    # sector) has no arc there, and the fitted one would reach into the UI above it.
    with np.errstate(invalid="ignore"):
        if np.mean(np.abs(inner - 0.5 - near) <= 2.0) < 0.5:
            return None
    if bottom is not None:
        # The header's region ends at the bottom of the image, which its deepest part (a
        # black lung below the pleura, say) need not show.
        far = bottom - apex[1]
    else:
        outer = _radial_edges(feat, apex, angles, np.arange(far - band, far + band, 1.0), last=True)
        # Rays through dark deep parts end short of the arc: only those reaching it count.
        outer = outer[outer >= far - 4 * f]
        if outer.size >= 8:
            far = float(np.median(outer)) + 0.5
    if far <= near + 8:
        return None
    return _Geometry(RegionShape.SECTOR, left, right, apex, near, far)


def _inside_frame(geo: _Geometry, shape: tuple[int, int]) -> bool:
    """Whether the whole geometry lies in the frame: one cut by the frame's border is a
    zoomed or panned image whose visible outline is not the probe's."""
    rows, cols = shape
    if geo.shape is RegionShape.RECTANGLE:
        ys = np.array([geo.near, geo.far])
        xs = np.concatenate([np.asarray(geo.left.x(ys)), np.asarray(geo.right.x(ys))])
    else:
        phi = np.array([math.atan(geo.left.b), math.atan(geo.right.b)])
        ys = geo.apex[1] + np.array([geo.near * np.cos(phi).min(), geo.far])
        xs = geo.apex[0] + geo.far * np.sin(phi)
    return bool(
        ys.min() >= -1.5 and ys.max() <= rows + 0.5 and xs.min() >= -1.5 and xs.max() <= cols + 0.5
    )


def _geometry_mask(geo: _Geometry, shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres lie inside ``geo``."""
    rows, cols = shape
    if geo.shape is RegionShape.RECTANGLE:
        y0, y1 = geo.near, geo.far
    else:
        cos_max = max(math.cos(math.atan(geo.left.b)), math.cos(math.atan(geo.right.b)))
        cos_min = min(math.cos(math.atan(geo.left.b)), math.cos(math.atan(geo.right.b)))
        y0 = geo.apex[1] + geo.near * cos_min
        y1 = geo.apex[1] + geo.far * max(cos_max, 1.0)
    r0, r1 = max(0, math.ceil(y0)), min(rows, math.floor(y1) + 1)
    mask = np.zeros(shape, dtype=bool)
    if r1 <= r0:
        return mask
    yy = np.arange(r0, r1, dtype=np.float64)[:, None]
    xl = np.asarray(geo.left.x(yy))
    xr = np.asarray(geo.right.x(yy))
    c0 = max(0, math.ceil(float(xl.min())))
    c1 = min(cols, math.floor(float(xr.max())) + 1)
    if c1 <= c0:
        return mask
    xx = np.arange(c0, c1, dtype=np.float64)[None, :]
    inside = (xx >= xl) & (xx <= xr)
    if geo.shape is RegionShape.RECTANGLE:
        inside &= (yy >= y0) & (yy <= y1)
    else:
        dist = np.hypot(xx - geo.apex[0], yy - geo.apex[1])
        inside &= (dist >= geo.near) & (dist <= geo.far) & (yy >= geo.apex[1])
    mask[r0:r1, c0:c1] = inside
    return mask


def _fit_geometry(
    comp: np.ndarray,
    feat: np.ndarray,
    factor: int,
    *,
    bottom: float | None,
    hull_area: int,
) -> tuple[_Geometry, np.ndarray] | None:
    """Fit a sector or a rectangle to the work-scale image area ``comp``; with its mask.

    ``feat`` is the full-resolution texture that places the edges to the pixel and
    ``bottom`` the known bottom boundary row (from the header), if any. Pairs of candidate
    sides are tried, best supported first; the first geometry that lies in the frame,
    holds the area (less its one-block rim) and is not far larger than its convex hull
    is the answer.
    """
    lefts, rights = _side_candidates(comp, factor)
    if not lefts or not rights:
        return None
    rr, cc = np.nonzero(comp)
    area = _Area(comp, feat, factor, (cc + 0.5) * factor - 0.5, (rr + 0.5) * factor - 0.5)
    shape = (feat.shape[0], feat.shape[1])
    core_r, core_c = np.nonzero(ndimage.binary_erosion(comp))
    core_r = np.minimum(core_r * factor + factor // 2, shape[0] - 1)
    core_c = np.minimum(core_c * factor + factor // 2, shape[1] - 1)
    pairs = sorted(
        itertools.product(lefts, rights), key=lambda pair: -(pair[0].support + pair[1].support)
    )
    for left, right in pairs:
        if abs(left.b) <= _VERTICAL_SLOPE and abs(right.b) <= _VERTICAL_SLOPE:
            geo = _rectangle(area, left, right, bottom)
        else:
            geo = _sector(area, left, right, bottom)
        if geo is None or not _inside_frame(geo, shape):
            continue
        mask = _geometry_mask(geo, shape)
        held = mask[core_r, core_c]
        if held.size and held.mean() >= _MIN_CONTAINED and mask.sum() <= 4 * hull_area:
            return geo, mask
        logger.debug("fitted %s rejected (holds %.3f of the area)", geo.shape, held.mean())
    return None


def region_from_image(
    grey: np.ndarray, *, within: tuple[int, int, int, int] | None = None
) -> ScanRegion | None:
    """Find the scan region by image analysis alone.

    The ultrasound image is the one large textured (speckled, noisy or moving) area of
    the frame; text, rulers, logos and bars are thin or small, flat UI panels and the
    background have no texture. Steps: neighbour differences (and temporal change for
    loops) above the background's noise, their density per small block, an opening with a
    square a little wider than a text line (removes the UI), the largest connected
    components; then a probe geometry (sector or rectangle) fitted to the outermost
    pixels of that area and placed to the pixel on the full-resolution texture. When
    none fits, the area's convex hull (sectors and rectangles are convex, which also
    restores dark anechoic areas at their edge). When nothing is textured enough, the
    large areas of pixels that differ from the background and are not flat (the faint
    noise of a probe in air).

    Parameters
    ----------
    grey
        ``(N, rows, cols)`` or ``(rows, cols)`` grey frames, 0-255.
    within
        ``(c0, r0, c1, r1)``: look only inside this rectangle (the header's region),
        whose bottom row is then the depth of a sector.

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
    allowed: np.ndarray | None = None
    if within is not None:
        # The texture (and its noise limit) is measured on the whole frame, where the
        # background is seen; only the area search is confined to the header's rectangle.
        c0, r0, c1, r1 = within
        allowed = np.zeros(work_shape, dtype=bool)
        allowed[r0 // factor : -(-r1 // factor), c0 // factor : -(-c1 // factor)] = True
    comp = None
    feat = np.zeros((rows, cols), dtype=bool)
    # Speckle is textured almost everywhere, text and UI graphics only along their thin
    # strokes. The fallback accepts sparse texture (faint noise of a probe in air).
    for limit, level in ((None, _DENSE), (0, _SPARSE)):
        feat = _textured(g, limit=limit)
        density = _density(feat, factor)
        if allowed is not None:
            density[~allowed] = 0.0
        work = (density >= level).astype(np.uint8)
        # Opening with a square (separable, so fast): removes all that is thinner than
        # the square: text, rulers, bars, logos, caliper arms, panel outlines.
        work = ndimage.maximum_filter(ndimage.minimum_filter(work, size), size)
        comp = _large_components(work.astype(bool), min_area)
        if comp is not None:
            comp |= _bands_below(comp, density >= _SPARSE)
            break
    if comp is None:
        # A probe in air may show only a faint, nearly flat sector of noise.
        feat, comp = _faint_area(g, factor, size, min_area, allowed)
    if comp is None:
        return None
    hull = _hull_mask(comp, factor, (rows, cols))
    if hull is None or not hull.any():
        return None
    mask, shape = hull, RegionShape.OTHER
    bottom = None if within is None else within[3] - 0.5
    fitted = _fit_geometry(comp, feat, factor, bottom=bottom, hull_area=int(hull.sum()))
    if fitted is not None:
        mask, shape = fitted[1], fitted[0].shape
    if within is not None:
        c0, r0, c1, r1 = within
        clip = np.zeros_like(mask)
        clip[r0:r1, c0:c1] = True
        mask = mask & clip
    box = bbox_of(mask)
    if box is None:
        return None
    return ScanRegion(box, mask, RegionSource.IMAGE, shape)
