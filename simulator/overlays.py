"""Burned-in vendor user interface: parameter text, logo, depth ruler, grey bar, calipers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from simulator.vendors import Corner, Side, VendorStyle, grey_map

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OverlayInfo:
    """What the vendor UI shows for one frame."""

    probe_label: str
    preset: str
    frequency_mhz: float
    gain_db: float
    dynamic_range_db: float
    depth_mm: float
    focus_mm: float
    frame_rate_hz: float
    patient_id: str
    date_text: str
    top_row: int
    """Row of depth 0 (probe face at the centre line)."""
    px_per_mm: float
    bbox: tuple[int, int, int, int]
    """Scan region ``(col0, row0, col1, row1)``, exclusive end."""
    calipers: tuple[tuple[tuple[float, float], tuple[float, float]], ...] = ()
    """Caliper pairs in pixel ``(col, row)`` coordinates."""
    caliper_mm: tuple[float, ...] = ()


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colour(style: VendorStyle, rgb: bool, scale: float = 1.0) -> int | tuple[int, int, int]:
    lay = style.layout
    if rgb:
        base = lay.text_rgb or (lay.text_grey,) * 3
        return tuple(int(c * scale) for c in base)  # type: ignore[return-value]
    return int(lay.text_grey * scale)


def draw_overlays(pixels: np.ndarray, *, style: VendorStyle, info: OverlayInfo) -> np.ndarray:
    """Draw the vendor UI on a frame (outside the scan region, calipers over it).

    Parameters
    ----------
    pixels
        ``(rows, cols)`` grey or ``(rows, cols, 3)`` RGB ``uint8`` frame.
    style
        Vendor whose layout is drawn.
    info
        Parameters and geometry to annotate.

    Returns
    -------
    numpy.ndarray
        A new array of the same shape with the annotations burned in.
    """
    rgb = pixels.ndim == 3
    rows, cols = pixels.shape[:2]
    img = Image.fromarray(pixels, "RGB" if rgb else "L")
    draw = ImageDraw.Draw(img)
    fsize = max(8, round(rows / 42))
    font = _font(fsize)
    small = _font(max(7, round(fsize * 0.8)))
    fg = _colour(style, rgb)
    dim = _colour(style, rgb, 0.7)
    lay = style.layout
    c0, r0, c1, r1 = info.bbox
    line_h = fsize + 2

    if lay.header_band:
        band = max(4, min(info.top_row - 3, round(rows * 0.05)))
        if band >= fsize:
            draw.rectangle([0, 0, cols - 1, band - 1], fill=_colour(style, rgb, 0.22))
            draw.text(
                (4, max(0, (band - fsize) // 2)),
                f"ID {info.patient_id}   {info.date_text}",
                fill=fg,
                font=small,
            )

    lines = [
        info.probe_label,
        info.preset,
        f"{info.frequency_mhz:.1f} MHz",
        f"G {50 + info.gain_db:.0f}",
        f"DR {info.dynamic_range_db:.0f}",
        f"D {info.depth_mm / 10:.1f} cm",
        f"FR {info.frame_rate_hz:.0f} Hz",
        "MI 1.1 TIs 0.4",
    ]
    lines += [f"D{i + 1} {mm / 10:.2f} cm" for i, mm in enumerate(info.caliper_mm)]
    left_space = c0 - 6
    right_space = cols - c1 - 6
    text_w = max(int(draw.textlength(s, font=font)) for s in lines)
    corner = lay.text_corner
    on_left = corner in (Corner.TOP_LEFT, Corner.BOTTOM_LEFT)
    if on_left and left_space < text_w and right_space > left_space:
        on_left = False
    elif not on_left and right_space < text_w and left_space > right_space:
        on_left = True
    x = 4 if on_left else cols - text_w - 4
    top = corner in (Corner.TOP_LEFT, Corner.TOP_RIGHT)
    y0 = (info.top_row + 2) if top else rows - 4 - line_h * len(lines)
    for i, s in enumerate(lines):
        draw.text((x, y0 + i * line_h), s, fill=fg, font=font)

    logo = style.name.split()[0].upper()
    model = style.model_name
    lw = int(max(draw.textlength(logo, font=font), draw.textlength(model, font=small)))
    logo_left = lay.logo_corner in (Corner.TOP_LEFT, Corner.BOTTOM_LEFT)
    if logo_left == on_left and top == (lay.logo_corner in (Corner.TOP_LEFT, Corner.TOP_RIGHT)):
        logo_left = not logo_left
    lx = 4 if logo_left else cols - lw - 4
    ly = 2 if lay.logo_corner in (Corner.TOP_LEFT, Corner.TOP_RIGHT) else rows - 2 * line_h - 2
    if lay.header_band and ly < info.top_row:
        ly = info.top_row + 2 if not top or on_left != logo_left else rows - 2 * line_h - 2
    draw.text((lx, ly), logo, fill=fg, font=font)
    draw.text((lx + 1, ly), logo, fill=fg, font=font)
    draw.text((lx, ly + line_h), model, fill=dim, font=small)

    # Depth ruler with a tick every centimetre, labels every 5 cm (every cm when shallow).
    rx = (c0 - 8) if lay.ruler_side is Side.LEFT else (c1 + 7)
    rx = int(np.clip(rx, 2, cols - 3))
    sgn = -1 if lay.ruler_side is Side.LEFT else 1
    draw.line([(rx, info.top_row), (rx, min(rows - 1, r1))], fill=dim, width=1)
    label_every = 10 if info.depth_mm <= 80 else 50
    for mm in range(0, int(info.depth_mm) + 1, 10):
        ry = info.top_row + mm * info.px_per_mm
        if ry >= rows:
            break
        ln = 6 if mm % 50 == 0 else 3
        draw.line([(rx, ry), (rx + sgn * ln, ry)], fill=fg, width=1)
        if mm % label_every == 0 and mm > 0:
            s = f"{mm // 10}"
            tw = draw.textlength(s, font=small)
            tx = rx + sgn * 8 if sgn > 0 else rx - 8 - tw
            draw.text((tx, ry - fsize // 2), s, fill=fg, font=small)
    # Focus marker
    fy = info.top_row + info.focus_mm * info.px_per_mm
    tri = [(rx - sgn * 2, fy), (rx - sgn * 7, fy - 4), (rx - sgn * 7, fy + 4)]
    draw.polygon(tri, fill=fg)

    # Grey bar showing the display map.
    lut = grey_map(style)
    bh = max(16, min(r1 - r0, rows) // 4)
    bx = rx + sgn * 18 if sgn > 0 else rx - 18 - 6
    bx = int(np.clip(bx, 0, cols - 7))
    by = max(info.top_row, 0)
    ramp = np.linspace(255, 0, bh).astype(np.uint8)
    bar = lut[ramp]
    arr = np.asarray(img).copy()
    if rgb:
        arr[by : by + bh, bx : bx + 6] = bar[: max(0, min(bh, rows - by)), None, :]
    else:
        arr[by : by + bh, bx : bx + 6] = bar[: max(0, min(bh, rows - by)), None]
    img = Image.fromarray(arr, "RGB" if rgb else "L")
    draw = ImageDraw.Draw(img)

    # Probe orientation mark near the top corner of the scan region.
    ox = c0 + 4 if style.layout.ruler_side is Side.RIGHT else c1 - 10
    oy = max(0, r0 - 9)
    draw.ellipse([ox, oy, ox + 6, oy + 6], fill=fg)

    for i, ((xa, ya), (xb, yb)) in enumerate(info.calipers):
        _caliper(draw, xa, ya, fg, str(i + 1))
        _caliper(draw, xb, yb, fg, None)
        n = int(max(abs(xb - xa), abs(yb - ya)) / 4)
        for k in range(1, n):
            if k % 2:
                px, py = xa + (xb - xa) * k / n, ya + (yb - ya) * k / n
                draw.point((px, py), fill=dim)
    return np.asarray(img)


def _caliper(draw: ImageDraw.ImageDraw, x: float, y: float, fill: object, tag: str | None) -> None:
    s = 4
    draw.line([(x - s, y), (x + s, y)], fill=fill)  # type: ignore[arg-type]
    draw.line([(x, y - s), (x, y + s)], fill=fill)  # type: ignore[arg-type]


def caliper_length_mm(
    pairs: Sequence[tuple[tuple[float, float], tuple[float, float]]],
) -> tuple[float, ...]:
    """Physical length of each caliper pair given in millimetres."""
    return tuple(float(np.hypot(b[0] - a[0], b[1] - a[1])) for a, b in pairs)
