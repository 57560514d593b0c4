"""B-mode image formation: beam grid, tissue maps, speckle, attenuation, scan conversion.

Anatomy is drawn in physical millimetres (``x`` lateral, ``z`` depth from the probe face)
directly onto the *beam grid* (depth samples x scan lines), where speckle is formed:
complex Gaussian scatterers weighted by tissue backscatter are convolved with a Gaussian
point-spread function and envelope-detected (fully developed speckle is Rayleigh). Depth
attenuation is the running sum of the tissue attenuation map along each beam, so strong
attenuators cast shadows and cysts give posterior enhancement against the time-gain
compensation, which only corrects the nominal soft-tissue attenuation. The detected
envelope is log compressed to the display dynamic range and scan converted to the
curvilinear, linear or phased geometry with a black background.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from simulator.vendors import ProbeKind

logger = logging.getLogger(__name__)

_EPS = 1e-12


@dataclass(frozen=True)
class BeamGeometry:
    """Transducer field of view in millimetres.

    For sector probes lines are angles (radians) from a virtual apex ``radius_mm``
    above the probe face; for linear probes lines are lateral positions.
    """

    kind: ProbeKind
    depth_mm: float
    """Imaging depth below the probe face."""
    angle_rad: float = 0.0
    """Full opening angle (sector probes)."""
    radius_mm: float = 0.0
    """Radius of curvature of the probe face (curvilinear) or virtual apex offset (phased)."""
    width_mm: float = 0.0
    """Aperture width (linear probes)."""

    def __post_init__(self) -> None:
        if self.depth_mm <= 0:
            raise ValueError(f"depth_mm must be positive, got {self.depth_mm}")
        if self.kind is ProbeKind.LINEAR and self.width_mm <= 0:
            raise ValueError("a linear probe needs width_mm > 0")
        if self.kind is not ProbeKind.LINEAR and not 0 < self.angle_rad < math.pi:
            raise ValueError(f"sector angle must be in (0, pi), got {self.angle_rad}")

    def to_beam(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map physical ``(x, z)`` to beam coordinates ``(depth along beam, line)``."""
        if self.kind is ProbeKind.LINEAR:
            return z, x
        zz = z + self.radius_mm
        return np.hypot(x, zz) - self.radius_mm, np.arctan2(x, zz)

    def to_physical(self, r: np.ndarray, line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map beam coordinates to physical ``(x, z)``."""
        if self.kind is ProbeKind.LINEAR:
            return line, r
        rr = r + self.radius_mm
        return rr * np.sin(line), rr * np.cos(line) - self.radius_mm

    @property
    def line_span(self) -> tuple[float, float]:
        """First and last line coordinate."""
        half = (self.width_mm if self.kind is ProbeKind.LINEAR else self.angle_rad) / 2
        return -half, half

    def extent(self) -> tuple[float, float, float, float]:
        """Physical bounding box ``(x0, x1, z0, z1)`` of the field of view."""
        lo, hi = self.line_span
        r = np.array([0.0, 0.0, self.depth_mm, self.depth_mm, self.depth_mm])
        line = np.array([lo, hi, lo, hi, 0.0])
        x, z = self.to_physical(r, line)
        return float(x.min()), float(x.max()), float(z.min()), float(z.max())


@dataclass(frozen=True)
class BeamGrid:
    """Sampled beam grid: ``n_r`` depth samples by ``n_lines`` scan lines."""

    geometry: BeamGeometry
    n_r: int
    n_lines: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_r, n_lines)``."""
        return self.n_r, self.n_lines

    @property
    def dr(self) -> float:
        """Depth step in mm."""
        return self.geometry.depth_mm / (self.n_r - 1)

    @property
    def r_axis(self) -> np.ndarray:
        """Depth of each sample, mm."""
        return _axes(self)[0]

    @property
    def line_axis(self) -> np.ndarray:
        """Coordinate of each line (radians or mm)."""
        return _axes(self)[1]

    def physical(self) -> tuple[np.ndarray, np.ndarray]:
        """Physical ``(x, z)`` of every grid sample (cached, read-only)."""
        return _physical(self)

    def window(self, x0: float, x1: float, z0: float, z1: float) -> tuple[slice, slice] | None:
        """Grid slices covering the physical box, or ``None`` if it misses the field of view."""
        geo = self.geometry
        if geo.kind is ProbeKind.LINEAR:
            rlo, rhi, llo, lhi = z0, z1, x0, x1
        else:
            ax, az = 0.0, -geo.radius_mm
            nx, nz = min(max(ax, x0), x1), min(max(az, z0), z1)
            corners_x = np.array([x0, x1, x0, x1])
            corners_z = np.array([z0, z0, z1, z1])
            rc = np.hypot(corners_x - ax, corners_z - az)
            rlo = math.hypot(nx - ax, nz - az) - geo.radius_mm
            rhi = float(rc.max()) - geo.radius_mm
            if z0 <= az:
                llo, lhi = -math.pi, math.pi
            else:
                th = np.arctan2(corners_x, corners_z - az)
                llo, lhi = float(th.min()), float(th.max())
        ra, la = self.r_axis, self.line_axis
        i0 = int(np.searchsorted(ra, rlo)) - 1
        i1 = int(np.searchsorted(ra, rhi)) + 1
        j0 = int(np.searchsorted(la, llo)) - 1
        j1 = int(np.searchsorted(la, lhi)) + 1
        i0, j0 = max(i0, 0), max(j0, 0)
        i1, j1 = min(i1, self.n_r), min(j1, self.n_lines)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(i0, i1), slice(j0, j1)


@lru_cache(maxsize=64)
def _axes(grid: BeamGrid) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = grid.geometry.line_span
    r = np.linspace(0.0, grid.geometry.depth_mm, grid.n_r)
    line = np.linspace(lo, hi, grid.n_lines)
    return r, line


@lru_cache(maxsize=64)
def _physical(grid: BeamGrid) -> tuple[np.ndarray, np.ndarray]:
    r, line = _axes(grid)
    x, z = grid.geometry.to_physical(r[:, None], line[None, :])
    x = np.ascontiguousarray(np.broadcast_to(x, grid.shape), dtype=np.float32)
    z = np.ascontiguousarray(np.broadcast_to(z, grid.shape), dtype=np.float32)
    x.setflags(write=False)
    z.setflags(write=False)
    return x, z


@dataclass(frozen=True)
class BodyPose:
    """Rigid placement of the anatomy under the probe (probe drift, breathing, tilt)."""

    dx: float = 0.0
    """Lateral shift of the anatomy, mm."""
    dz: float = 0.0
    """Depth shift of the anatomy, mm."""
    angle: float = 0.0
    """In-plane rotation of the anatomy about the field-of-view centre, radians."""
    cz: float = 40.0
    """Depth of the rotation centre, mm."""


@dataclass
class Canvas:
    """Tissue property maps on a beam grid, painted with simple shapes.

    ``echo`` is backscattered intensity relative to liver parenchyma, ``atten`` extra
    round-trip attenuation in dB/mm above the nominal soft-tissue value (which the TGC
    removes), ``coherent`` the amplitude of specular (non-speckled) reflectors, and
    ``artifact`` intensity added after attenuation (reverberations, comet tails).
    """

    grid: BeamGrid
    pose: BodyPose = field(default_factory=BodyPose)
    background: float = 1.0
    echo: np.ndarray = field(init=False)
    atten: np.ndarray = field(init=False)
    coherent: np.ndarray = field(init=False)
    artifact: np.ndarray = field(init=False)
    _bx: np.ndarray = field(init=False, repr=False)
    _bz: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        shape = self.grid.shape
        self.echo = np.full(shape, self.background, dtype=np.float32)
        self.atten = np.zeros(shape, dtype=np.float32)
        self.coherent = np.zeros(shape, dtype=np.float32)
        self.artifact = np.zeros(shape, dtype=np.float32)
        x, z = self.grid.physical()
        p = self.pose
        c, s = math.cos(p.angle), math.sin(p.angle)
        xr, zr = x - p.dx, z - p.dz - p.cz
        self._bx = (c * xr + s * zr).astype(np.float32)
        self._bz = (-s * xr + c * zr + p.cz).astype(np.float32)

    # -- coordinates -------------------------------------------------------------------
    def _to_probe(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.pose
        c, s = math.cos(p.angle), math.sin(p.angle)
        zc = z - p.cz
        return c * x - s * zc + p.dx, s * x + c * zc + p.cz + p.dz

    def _coords(
        self, box: tuple[float, float, float, float], body: bool
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        x0, x1, z0, z1 = box
        if body:
            cx = np.array([x0, x1, x0, x1])
            cz = np.array([z0, z0, z1, z1])
            px, pz = self._to_probe(cx, cz)
            win = self.grid.window(px.min(), px.max(), pz.min(), pz.max())
            if win is None:
                return None
            return win, self._bx[win], self._bz[win]
        win = self.grid.window(x0, x1, z0, z1)
        if win is None:
            return None
        x, z = self.grid.physical()
        return win, x[win], z[win]

    def _apply(
        self,
        win: tuple[slice, slice],
        w: np.ndarray,
        echo: float | np.ndarray | None,
        atten: float | None,
        coherent: float | None,
        artifact: float | None,
        echo_mode: str,
    ) -> None:
        if echo is not None:
            e = self.echo[win]
            if echo_mode == "mul":
                e *= 1 + w * (np.asarray(echo, dtype=np.float32) - 1)
            else:
                e += w * (np.asarray(echo, dtype=np.float32) - e)
                if coherent is None:
                    # A filled shape covers specular walls painted before it.
                    self.coherent[win] *= 1 - w
        if atten is not None:
            a = self.atten[win]
            a += w * (atten - a)
        if coherent is not None:
            c = self.coherent[win]
            np.maximum(c, w * coherent, out=c)
        if artifact is not None:
            self.artifact[win] += w * artifact

    # -- shapes ------------------------------------------------------------------------
    def ellipse(
        self,
        cx: float,
        cz: float,
        ax: float,
        az: float,
        *,
        angle: float = 0.0,
        echo: float | None = None,
        atten: float | None = None,
        coherent: float | None = None,
        artifact: float | None = None,
        edge: float = 0.4,
        harmonics: tuple[tuple[int, float, float], ...] = (),
        body: bool = True,
        echo_mode: str = "set",
        hollow: float | None = None,
        texture: np.ndarray | None = None,
    ) -> None:
        """Paint a (rotated, optionally lobulated) ellipse.

        ``harmonics`` perturb the radius as ``1 + sum(a cos(k phi + p))`` for
        lobulated or irregular margins; ``edge`` is the blur width of the border in mm;
        ``hollow`` paints only a wall of that thickness (mm).
        """
        amp = sum(abs(a) for _, a, _ in harmonics)
        ext = max(ax, az) * (1 + amp) + 2 * edge + 1.0
        got = self._coords((cx - ext, cx + ext, cz - ext, cz + ext), body)
        if got is None:
            return
        win, x, z = got
        c, s = math.cos(angle), math.sin(angle)
        u = (x - cx) * c + (z - cz) * s
        v = -(x - cx) * s + (z - cz) * c
        rho = np.sqrt((u / ax) ** 2 + (v / az) ** 2)
        if harmonics:
            phi = np.arctan2(v / az, u / ax)
            scale = np.ones_like(rho)
            for k, a, p in harmonics:
                scale += a * np.cos(k * phi + p)
            rho = rho / np.maximum(scale, 0.2)
        # Signed distance (mm) approximated by radial distance scaled by the mean radius.
        d = (rho - 1.0) * (0.5 * (ax + az))
        if hollow is not None:
            d = np.abs(d + hollow / 2) - hollow / 2
        w = np.clip(0.5 - d / max(edge, 1e-3), 0.0, 1.0).astype(np.float32)
        e: float | np.ndarray | None = echo
        if texture is not None and echo is not None:
            e = echo * texture[win]
        self._apply(win, w, e, atten, coherent, artifact, echo_mode)

    def polyline_band(
        self,
        xs: np.ndarray,
        zs: np.ndarray,
        thickness: float,
        *,
        echo: float | None = None,
        atten: float | None = None,
        coherent: float | None = None,
        artifact: float | None = None,
        edge: float = 0.3,
        body: bool = True,
        below: float = 0.0,
        echo_mode: str = "set",
    ) -> None:
        """Paint a band of ``thickness`` mm following ``z = interp(x; xs, zs)``.

        With ``below > 0`` the band also fills ``below`` mm under the curve's lower edge
        (layers of tissue with a curved upper surface).
        """
        xs = np.asarray(xs, dtype=np.float64)
        zs = np.asarray(zs, dtype=np.float64)
        box = (
            float(xs.min()),
            float(xs.max()),
            float(zs.min()) - thickness - edge - 1,
            float(zs.max()) + thickness + below + edge + 1,
        )
        got = self._coords(box, body)
        if got is None:
            return
        win, x, z = got
        zc = np.interp(x, xs, zs).astype(np.float32)
        inside_x = ((x >= xs[0]) & (x <= xs[-1])).astype(np.float32)
        half = thickness / 2
        d = np.abs(z - zc - below / 2) - (half + below / 2)
        w = np.clip(0.5 - d / max(edge, 1e-3), 0.0, 1.0) * inside_x
        self._apply(win, w.astype(np.float32), echo, atten, coherent, artifact, echo_mode)

    def layer(
        self,
        z_top: float,
        z_bottom: float,
        *,
        echo: float | None = None,
        atten: float | None = None,
        edge: float = 0.5,
        body: bool = False,
        texture: np.ndarray | None = None,
    ) -> None:
        """Paint a horizontal slab between two depths across the whole field of view."""
        big = 1e3
        got = self._coords((-big, big, z_top - edge - 1, z_bottom + edge + 1), body)
        if got is None:
            return
        win, _, z = got
        d = np.abs(z - (z_top + z_bottom) / 2) - (z_bottom - z_top) / 2
        w = np.clip(0.5 - d / max(edge, 1e-3), 0.0, 1.0).astype(np.float32)
        e: float | np.ndarray | None = echo
        if texture is not None and echo is not None:
            e = echo * texture[win]
        self._apply(win, w, e, atten, None, None, "set")

    def beam_streak(
        self,
        x_at: float,
        z_from: float,
        width: float,
        intensity: float,
        *,
        z_to: float | None = None,
        decay_mm: float | None = None,
    ) -> None:
        """Add a reverberation streak along the beam through ``(x_at, z_from)`` (comet tail)."""
        geo = self.grid.geometry
        r0, l0 = geo.to_beam(np.array([x_at]), np.array([z_from]))
        r0f, l0f = float(r0[0]), float(l0[0])
        ra, la = self.grid.r_axis, self.grid.line_axis
        if geo.kind is ProbeKind.LINEAR:
            lw = width
        else:
            lw = width / max(r0f + geo.radius_mm, 1.0)
        j0 = max(int(np.searchsorted(la, l0f - 2 * lw)) - 1, 0)
        j1 = min(int(np.searchsorted(la, l0f + 2 * lw)) + 1, self.grid.n_lines)
        i0 = int(np.searchsorted(ra, r0f))
        i1 = self.grid.n_r if z_to is None else int(np.searchsorted(ra, r0f + (z_to - z_from)))
        if j0 >= j1 or i0 >= i1:
            return
        lateral = np.exp(-0.5 * ((la[j0:j1] - l0f) / (lw / 2)) ** 2)
        depth = ra[i0:i1] - r0f
        axial = np.ones_like(depth) if decay_mm is None else np.exp(-depth / decay_mm)
        self.artifact[i0:i1, j0:j1] += (intensity * axial[:, None] * lateral[None, :]).astype(
            np.float32
        )

    def smooth_texture(
        self, rng: np.random.Generator, sigma_db: float, cells: int = 10
    ) -> np.ndarray:
        """A smooth log-normal multiplicative field on the grid (organ heterogeneity)."""
        return smooth_field(rng, self.grid.shape, sigma_db, cells)


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, int], sigma_db: float, cells: int = 10
) -> np.ndarray:
    """Smooth log-normal random field of ``shape`` with ``sigma_db`` dB of variation."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    fine = ndimage.zoom(coarse, (shape[0] / cells, shape[1] / cells), order=1, mode="nearest")
    fine = fine[: shape[0], : shape[1]]
    if fine.shape != shape:
        fine = np.pad(fine, ((0, shape[0] - fine.shape[0]), (0, shape[1] - fine.shape[1])), "edge")
    return np.power(10.0, sigma_db * fine / 10.0).astype(np.float32)


def speckle_envelope(
    intensity: np.ndarray,
    *,
    rng: np.random.Generator,
    axial_sigma: float,
    lateral_sigma: float,
    coherent: np.ndarray | None = None,
    far_lateral_sigma: float = 0.0,
    focus_weight: np.ndarray | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Detected echo envelope of a scatterer field: fully developed speckle.

    Complex circular Gaussian scatterers with variance ``intensity`` are convolved with
    a Gaussian point-spread function (``axial_sigma`` samples by ``lateral_sigma``
    lines) and envelope-detected, so a homogeneous region is Rayleigh distributed with
    mean intensity ``intensity``.

    Parameters
    ----------
    intensity
        ``(n_r, n_lines)`` backscattered intensity (variance of the scatterer field).
    rng
        Random generator (the only source of randomness).
    axial_sigma, lateral_sigma
        Point-spread sigmas in samples and lines.
    coherent
        Optional amplitude of specular reflectors added in phase (no speckle).
    far_lateral_sigma
        Extra lateral blur out of the focal zone, blended in with ``focus_weight``.
    focus_weight
        ``(n_r,)`` weights in [0, 1] of the out-of-focus blur per depth.
    noise
        Optional ``(2, n_r, n_lines)`` standard normal field (real, imaginary) to use
        instead of drawing one, so cine frames can share correlated speckle.

    Returns
    -------
    numpy.ndarray
        ``float32`` envelope of the same shape, in amplitude units.
    """
    if intensity.ndim != 2:
        raise ValueError(f"intensity must be 2-D, got shape {intensity.shape}")
    if axial_sigma <= 0 or lateral_sigma <= 0:
        raise ValueError("point-spread sigmas must be positive")
    amp = np.sqrt(np.maximum(intensity, 0.0) * 0.5).astype(np.float32)
    if noise is None:
        field_ = rng.standard_normal((2, *intensity.shape), dtype=np.float32)
    elif noise.shape != (2, *intensity.shape):
        raise ValueError(f"noise must have shape {(2, *intensity.shape)}, got {noise.shape}")
    else:
        field_ = noise.astype(np.float32, copy=True)
    field_ *= amp
    if coherent is not None:
        field_[0] += coherent
    field_ = ndimage.gaussian_filter(field_, (0, axial_sigma, lateral_sigma), truncate=3.0)
    # Restore unit gain for incoherent scatterers: sum of squared kernel weights.
    field_ *= math.sqrt(4.0 * math.pi * axial_sigma * lateral_sigma)
    if far_lateral_sigma > 0 and focus_weight is not None:
        blurred = ndimage.gaussian_filter1d(field_, far_lateral_sigma, axis=2, truncate=3.0)
        gain = math.sqrt((lateral_sigma**2 + far_lateral_sigma**2) ** 0.5 / lateral_sigma)
        w = focus_weight.astype(np.float32)[None, :, None]
        field_ = field_ * (1 - w) + blurred * (gain * w)
    env = np.hypot(field_[0], field_[1])
    return env


def log_compress(
    envelope: np.ndarray, *, dynamic_range_db: float, gain_db: float, top_db: float = 25.0
) -> np.ndarray:
    """Log-compress an envelope to display values in [0, 1].

    ``top_db`` above the reference level (liver-like tissue, unit intensity) maps to
    white and ``dynamic_range_db`` below it to black; ``gain_db`` shifts everything.
    """
    if dynamic_range_db <= 0:
        raise ValueError(f"dynamic_range_db must be positive, got {dynamic_range_db}")
    db = 20.0 * np.log10(envelope + _EPS)
    out = (db + gain_db - top_db + dynamic_range_db) / dynamic_range_db
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class ScanLayout:
    """Placement of the field of view on the output frame."""

    rows: int
    cols: int
    top: int
    """Row of the shallowest point of the field of view."""
    center_col: float
    """Column of ``x = 0``."""
    spacing_mm: float
    """Millimetres per pixel (square pixels)."""
    z0: float
    """Physical depth at row ``top``."""


def fit_layout(
    geometry: BeamGeometry,
    size: tuple[int, int],
    *,
    top_margin: float,
    bottom_margin: float = 0.04,
    width_fraction: float = 0.72,
    offset: float = 0.0,
) -> ScanLayout:
    """Scale and place the field of view inside the frame, leaving margins for the UI."""
    rows, cols = size
    x0, x1, z0, z1 = geometry.extent()
    avail_h = rows * (1 - top_margin - bottom_margin)
    avail_w = cols * width_fraction
    spacing = max((z1 - z0) / avail_h, (x1 - x0) / avail_w)
    top = round(rows * top_margin)
    center = cols / 2 + offset * cols - (x0 + x1) / 2 / spacing
    return ScanLayout(rows, cols, top, center, spacing, z0)


@dataclass(frozen=True)
class ScanConverter:
    """Precomputed bilinear mapping from the beam grid to output pixels."""

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    flat_index: np.ndarray
    i0: np.ndarray
    j0: np.ndarray
    wi: np.ndarray
    wj: np.ndarray
    n_lines: int

    def __call__(self, beam_image: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Scan convert a ``(n_r, n_lines)`` image to the ``(rows, cols)`` frame."""
        flat = beam_image.ravel()
        n = self.n_lines
        base = self.i0 * n + self.j0
        v00 = flat[base]
        v01 = flat[base + 1]
        v10 = flat[base + n]
        v11 = flat[base + n + 1]
        top = v00 + (v01 - v00) * self.wj
        bot = v10 + (v11 - v10) * self.wj
        vals = top + (bot - top) * self.wi
        out = np.full(self.mask.shape, fill, dtype=beam_image.dtype)
        out.ravel()[self.flat_index] = vals
        return out


@lru_cache(maxsize=32)
def scan_converter(grid: BeamGrid, layout: ScanLayout) -> ScanConverter:
    """Build (and cache) the scan converter of a grid placed by ``layout``."""
    geo = grid.geometry
    rows, cols = layout.rows, layout.cols
    rr, cc = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x = (cc + 0.5 - layout.center_col) * layout.spacing_mm
    z = (rr + 0.5 - layout.top) * layout.spacing_mm + layout.z0
    r, line = geo.to_beam(x, z)
    lo, hi = geo.line_span
    mask = (r >= 0) & (r <= geo.depth_mm) & (line >= lo) & (line <= hi)
    fi = r[mask] / grid.dr
    fj = (line[mask] - lo) / (hi - lo) * (grid.n_lines - 1)
    i0 = np.clip(np.floor(fi), 0, grid.n_r - 2).astype(np.int64)
    j0 = np.clip(np.floor(fj), 0, grid.n_lines - 2).astype(np.int64)
    wi = np.clip(fi - i0, 0, 1).astype(np.float32)
    wj = np.clip(fj - j0, 0, 1).astype(np.float32)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("the field of view does not intersect the frame")
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    mask.setflags(write=False)
    return ScanConverter(
        mask=mask,
        bbox=bbox,
        flat_index=np.flatnonzero(mask),
        i0=i0,
        j0=j0,
        wi=wi,
        wj=wj,
        n_lines=grid.n_lines,
    )


@dataclass(frozen=True)
class Acquisition:
    """System settings for forming one frame from a canvas."""

    frequency_mhz: float
    dynamic_range_db: float
    gain_db: float
    psf_axial: float
    psf_lateral: float
    focus_mm: float
    noise_deep_db: float = -30.0
    """Electronic noise at maximum depth relative to tissue, dB (after TGC)."""
    tgc_error_db: np.ndarray | None = None
    """Per-sample residual TGC error along depth, dB."""
    motion_blur: float = 0.0
    """Lateral intensity blur in lines (probe motion during acquisition)."""
    haze: float = 0.0
    """Near-field clutter level (0: none), intensity relative to tissue."""
    dropout: tuple[float, float, float] | None = None
    """Poor-contact shadow: (centre line fraction, width fraction, depth of loss in dB)."""
    speckle_reduction: float = 0.0


def form_beam_image(
    canvas: Canvas,
    acq: Acquisition,
    rng: np.random.Generator,
    *,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Form the log-compressed display image ``[0, 1]`` on the beam grid."""
    grid = canvas.grid
    r = grid.r_axis.astype(np.float32)
    # Two-way extra attenuation integrated along each beam (dB), zero for nominal tissue.
    cum_db = np.cumsum(canvas.atten, axis=0) * np.float32(grid.dr)
    # Attenuation up to the *start* of each sample, so a reflector is not its own shadow.
    cum_db -= canvas.atten * np.float32(grid.dr)
    transmission = np.power(np.float32(10.0), -np.minimum(cum_db, 80.0) / 20.0)
    intensity = canvas.echo * transmission * transmission
    coherent = canvas.coherent * transmission
    if acq.dropout is not None:
        c, wdt, loss = acq.dropout
        la = np.linspace(0, 1, grid.n_lines, dtype=np.float32)
        prof = np.exp(-0.5 * ((la - c) / max(wdt / 2, 1e-3)) ** 2)
        intensity *= np.power(np.float32(10.0), -loss * prof / 10.0)[None, :]
    intensity += canvas.artifact
    if acq.haze > 0:
        hz = acq.haze * np.exp(-r / (0.35 * grid.geometry.depth_mm))
        intensity += (hz[:, None] * smooth_field(rng, grid.shape, 4.0, 6)).astype(np.float32)
    depth = grid.geometry.depth_mm
    alpha = 0.5 * acq.frequency_mhz * 2 / 10.0  # nominal two-way dB/mm
    noise_db = acq.noise_deep_db - alpha * (depth - r)
    intensity += np.power(np.float32(10.0), noise_db / 10.0)[:, None].astype(np.float32)
    if acq.tgc_error_db is not None:
        intensity *= np.power(np.float32(10.0), acq.tgc_error_db / 10.0)[:, None].astype(np.float32)
    focus_w = np.clip(np.abs(r - acq.focus_mm) / (0.5 * depth), 0.0, 1.0)
    env = speckle_envelope(
        intensity,
        rng=rng,
        axial_sigma=acq.psf_axial,
        lateral_sigma=acq.psf_lateral,
        coherent=coherent,
        far_lateral_sigma=acq.psf_lateral * 1.2,
        focus_weight=focus_w,
        noise=noise,
    )
    if acq.motion_blur > 0:
        env = np.sqrt(ndimage.gaussian_filter1d(env * env, acq.motion_blur, axis=1))
    img = log_compress(env, dynamic_range_db=acq.dynamic_range_db, gain_db=acq.gain_db)
    if acq.speckle_reduction > 0:
        img = ndimage.gaussian_filter(img, acq.speckle_reduction)
    return img
