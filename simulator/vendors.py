"""Fictional ultrasound vendor styles: grey maps, tints, resolution, geometry and UI layout.

Every name here is invented; none is, or is meant to resemble, a real manufacturer.
One style, :data:`HELD_OUT_VENDOR`, is meant to be kept out of model training so that
vendor generalisation can be measured on it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

import numpy as np

logger = logging.getLogger(__name__)


class ProbeKind(StrEnum):
    """Transducer array geometry, which fixes the shape of the scan region."""

    CURVILINEAR = "curvilinear"
    """Convex array: annular sector with a rounded top (abdomen, lung)."""
    LINEAR = "linear"
    """Linear array: rectangular field of view (thyroid, superficial lung)."""
    PHASED = "phased"
    """Phased array: narrow-apex sector (cardiac)."""


class Corner(StrEnum):
    """Corner of the frame where an overlay block is drawn."""

    TOP_LEFT = "top_left"
    """Upper left corner."""
    TOP_RIGHT = "top_right"
    """Upper right corner."""
    BOTTOM_LEFT = "bottom_left"
    """Lower left corner."""
    BOTTOM_RIGHT = "bottom_right"
    """Lower right corner."""


class Side(StrEnum):
    """Side of the scan region where the depth ruler and grey bar go."""

    LEFT = "left"
    """Left of the scan region."""
    RIGHT = "right"
    """Right of the scan region."""


@dataclass(frozen=True)
class OverlayLayout:
    """Where a vendor's user interface puts its burned-in annotations."""

    text_corner: Corner
    """Corner of the acquisition parameter block (frequency, gain, depth...)."""
    logo_corner: Corner
    """Corner of the vendor name / model badge."""
    ruler_side: Side
    """Side of the depth ruler (ticks every centimetre)."""
    header_band: bool
    """Whether a dark grey title band with patient data runs across the top."""
    text_grey: int
    """Grey level (0-255) of annotation text."""
    text_rgb: tuple[int, int, int] | None = None
    """Colour of annotation text for colour vendors (``None``: grey)."""


@dataclass(frozen=True)
class VendorStyle:
    """Image formation and display settings of one fictional scanner model.

    Attributes are deliberately coarse: they stand for the user-visible differences
    between scanners (grey map, tint, speckle size, sector shape, screen layout).
    """

    name: str
    """Manufacturer (0008,0070)."""
    model_name: str
    """Manufacturer's Model Name (0008,1090)."""
    software_version: str
    """Software Versions (0018,1020)."""
    station_prefix: str
    """Station Name (0008,1010) prefix; a number is appended per study."""
    gain_db: float
    """Default overall gain offset, dB."""
    dynamic_range_db: float
    """Displayed dynamic range of the log compression, dB."""
    gamma: float
    """Grey-map exponent (<1 brightens mid-greys)."""
    s_curve: float
    """Strength of a sigmoid contrast curve blended into the grey map (0: none)."""
    tint: tuple[float, float, float] | None
    """RGB multipliers of a colour-tinted B-mode map (``None``: grey output)."""
    psf_axial: float
    """Axial point-spread sigma in beam samples (speckle height)."""
    psf_lateral: float
    """Lateral point-spread sigma in scan lines (speckle width)."""
    line_density: float
    """Scan lines per output pixel of sector width (lateral sampling)."""
    speckle_reduction: float
    """Post-detection smoothing sigma in pixels (0: none), like speckle-reduction filters."""
    curvilinear_angle_deg: float
    """Opening angle of convex-array sectors, degrees."""
    curvilinear_radius_mm: float
    """Radius of curvature of the convex array, mm."""
    phased_angle_deg: float
    """Opening angle of phased-array sectors, degrees."""
    linear_width_mm: float
    """Aperture width of the linear array, mm."""
    native_size: tuple[int, int]
    """Screen matrix (rows, columns) the scanner exports at."""
    region_offset: float
    """Horizontal offset of the scan region centre, as a fraction of the frame width."""
    top_margin: float
    """Fraction of the frame height above the scan region."""
    layout: OverlayLayout
    """Placement of annotations."""


VENDOR_STYLES: dict[str, VendorStyle] = {
    style.name: style
    for style in (
        VendorStyle(
            name="Northwind Medical",
            model_name="Vista NW700",
            software_version="NW-OS 4.2.1",
            station_prefix="NWVISTA",
            gain_db=0.0,
            dynamic_range_db=60.0,
            gamma=1.0,
            s_curve=0.0,
            tint=None,
            psf_axial=1.2,
            psf_lateral=1.3,
            line_density=0.55,
            speckle_reduction=0.0,
            curvilinear_angle_deg=70.0,
            curvilinear_radius_mm=50.0,
            phased_angle_deg=80.0,
            linear_width_mm=45.0,
            native_size=(600, 800),
            region_offset=0.0,
            top_margin=0.09,
            layout=OverlayLayout(
                text_corner=Corner.TOP_LEFT,
                logo_corner=Corner.TOP_RIGHT,
                ruler_side=Side.RIGHT,
                header_band=False,
                text_grey=220,
            ),
        ),
        VendorStyle(
            name="Aurora Imaging",
            model_name="Lumen S8",
            software_version="AUR 2.17.0",
            station_prefix="AURLUMEN",
            gain_db=3.0,
            dynamic_range_db=54.0,
            gamma=0.8,
            s_curve=0.2,
            tint=(1.0, 0.86, 0.66),
            psf_axial=1.5,
            psf_lateral=1.7,
            line_density=0.45,
            speckle_reduction=0.0,
            curvilinear_angle_deg=62.0,
            curvilinear_radius_mm=60.0,
            phased_angle_deg=90.0,
            linear_width_mm=38.0,
            native_size=(480, 640),
            region_offset=0.06,
            top_margin=0.12,
            layout=OverlayLayout(
                text_corner=Corner.TOP_RIGHT,
                logo_corner=Corner.BOTTOM_LEFT,
                ruler_side=Side.LEFT,
                header_band=True,
                text_grey=200,
                text_rgb=(240, 200, 120),
            ),
        ),
        VendorStyle(
            name="Kestrel Sonics",
            model_name="KX-5 Pro",
            software_version="KXS 11.0.3",
            station_prefix="KESTREL",
            gain_db=-3.0,
            dynamic_range_db=66.0,
            gamma=1.2,
            s_curve=0.35,
            tint=None,
            psf_axial=0.9,
            psf_lateral=1.0,
            line_density=0.7,
            speckle_reduction=0.0,
            curvilinear_angle_deg=76.0,
            curvilinear_radius_mm=42.0,
            phased_angle_deg=84.0,
            linear_width_mm=50.0,
            native_size=(768, 1024),
            region_offset=-0.08,
            top_margin=0.07,
            layout=OverlayLayout(
                text_corner=Corner.BOTTOM_RIGHT,
                logo_corner=Corner.TOP_LEFT,
                ruler_side=Side.RIGHT,
                header_band=False,
                text_grey=255,
            ),
        ),
        VendorStyle(
            name="Meridian Diagnostics",
            model_name="Apex M3",
            software_version="MDX 7.4",
            station_prefix="MERIDIAN",
            gain_db=1.5,
            dynamic_range_db=72.0,
            gamma=0.9,
            s_curve=0.5,
            tint=(0.78, 0.9, 1.0),
            psf_axial=1.3,
            psf_lateral=2.0,
            line_density=0.5,
            speckle_reduction=0.6,
            curvilinear_angle_deg=66.0,
            curvilinear_radius_mm=55.0,
            phased_angle_deg=76.0,
            linear_width_mm=40.0,
            native_size=(576, 720),
            region_offset=0.0,
            top_margin=0.1,
            layout=OverlayLayout(
                text_corner=Corner.TOP_LEFT,
                logo_corner=Corner.BOTTOM_RIGHT,
                ruler_side=Side.LEFT,
                header_band=True,
                text_grey=210,
                text_rgb=(150, 210, 255),
            ),
        ),
        VendorStyle(
            name="Solace Systems",
            model_name="Harmony H1",
            software_version="SLC 1.9.8",
            station_prefix="SOLACE",
            gain_db=-1.0,
            dynamic_range_db=50.0,
            gamma=1.35,
            s_curve=0.0,
            tint=None,
            psf_axial=1.7,
            psf_lateral=1.5,
            line_density=0.6,
            speckle_reduction=1.2,
            curvilinear_angle_deg=58.0,
            curvilinear_radius_mm=65.0,
            phased_angle_deg=72.0,
            linear_width_mm=42.0,
            native_size=(600, 800),
            region_offset=0.1,
            top_margin=0.14,
            layout=OverlayLayout(
                text_corner=Corner.BOTTOM_LEFT,
                logo_corner=Corner.TOP_LEFT,
                ruler_side=Side.LEFT,
                header_band=False,
                text_grey=170,
            ),
        ),
    )
}
"""All fictional vendor styles, by manufacturer name."""

HELD_OUT_VENDOR = "Solace Systems"
"""Vendor meant to be kept out of training, to measure generalisation to an unseen scanner."""

TRAINING_VENDORS: tuple[str, ...] = tuple(n for n in VENDOR_STYLES if n != HELD_OUT_VENDOR)
"""Vendors meant for training data."""


def get_vendor(name: str | VendorStyle) -> VendorStyle:
    """Return the style of vendor ``name`` (a style given as such is returned as it is,
    which lets a caller simulate a modified scanner, e.g. a new probe or a gain change).

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`VENDOR_STYLES`.
    """
    if isinstance(name, VendorStyle):
        return name
    try:
        return VENDOR_STYLES[name]
    except KeyError:
        raise ValueError(
            f"unknown vendor {name!r}; expected one of {sorted(VENDOR_STYLES)}"
        ) from None


@lru_cache(maxsize=16)
def grey_map(style: VendorStyle) -> np.ndarray:
    """Display lookup table of a vendor style: 256 entries, ``uint8`` grey or ``(256, 3)`` RGB.

    The map is gamma, blended with a sigmoid contrast curve, then tinted.
    """
    x = np.linspace(0.0, 1.0, 256)
    y = x**style.gamma
    if style.s_curve > 0:
        sig = 1.0 / (1.0 + np.exp(-(x - 0.5) * 9.0))
        sig = (sig - sig[0]) / (sig[-1] - sig[0])
        y = (1 - style.s_curve) * y + style.s_curve * sig
    if style.tint is None:
        lut = np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)
    else:
        tint = np.asarray(style.tint)
        # Tinted maps keep white highlights near white, like sepia/blue B-mode maps.
        rgb = y[:, None] * tint[None, :] + (y[:, None] ** 3) * (1 - tint[None, :])
        lut = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


#: Acquisition changes of a scanner that a site sees without a new vendor: the overall
#: gain turned up, a narrower dynamic range (a preset), a coarser probe (point spread
#: 1.6 times wider, scan lines 1.6 times sparser).
ACQUISITION_CHANGES: tuple[str, ...] = ("gain+3", "gain+8", "dynamic-range-15",
                                        "coarse-probe")


def acquisition_change(vendor: str | VendorStyle, change: str) -> VendorStyle:
    """The style of ``vendor``'s scanner under acquisition ``change`` (one of
    :data:`ACQUISITION_CHANGES`).

    Raises
    ------
    ValueError
        If ``change`` is unknown.
    """
    style = get_vendor(vendor)
    if change == "gain+3":
        return dataclasses.replace(style, gain_db=style.gain_db + 3.0)
    if change == "gain+8":
        return dataclasses.replace(style, gain_db=style.gain_db + 8.0)
    if change == "dynamic-range-15":
        return dataclasses.replace(style, dynamic_range_db=max(20.0, style.dynamic_range_db - 15))
    if change == "coarse-probe":
        factor = 1.6
        return dataclasses.replace(style, psf_axial=style.psf_axial * factor,
                                   psf_lateral=style.psf_lateral * factor,
                                   line_density=style.line_density / factor)
    raise ValueError(f"unknown acquisition change {change!r}; one of "
                     f"{', '.join(ACQUISITION_CHANGES)}")
