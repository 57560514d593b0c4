"""Who made the images: the vendor and scanner a drift stream is kept for.

Scanners write Manufacturer (0008,0070) and Manufacturer's Model Name (0008,1090) as they
please: ``GE Healthcare``, ``GE HEALTHCARE``, ``GE Medical Systems``, ``"Philips "``. A
stream is keyed on a normalised form (lower case, punctuation and repeated spaces folded)
after the site's aliases (``SONONODE_VENDOR_ALIASES``) map its variants onto one name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

UNKNOWN = "unknown"
"""Key of a Manufacturer or Model Name the header leaves empty."""

_SEPARATORS = re.compile(r"[^0-9a-z]+")


def normalise(text: str | None) -> str:
    """``"GE  Healthcare, Inc."`` -> ``"ge healthcare inc"``; empty -> ``"unknown"``."""
    folded = _SEPARATORS.sub(" ", (text or "").casefold()).strip()
    return folded or UNKNOWN


@dataclass(frozen=True)
class Scanner:
    """A normalised vendor and scanner model, and the header values they came from."""

    vendor: str
    """Normalised Manufacturer, after aliases: the ``vendor`` label of drift metrics."""
    scanner: str
    """Normalised Manufacturer's Model Name: the ``scanner`` label."""
    as_sent: str
    """``Manufacturer / Model Name`` as the first header of the stream wrote them."""


def scanner_of(
    manufacturer: str | None, model_name: str | None, aliases: Mapping[str, str] | None = None
) -> Scanner:
    """The stream key of an image from its header values.

    ``aliases`` maps normalised manufacturer names to the name they stand for (keys and
    values are normalised here too, so ``{"GE Medical Systems": "GE Healthcare"}`` works).
    """
    vendor = normalise(manufacturer)
    table = {normalise(k): normalise(v) for k, v in (aliases or {}).items()}
    vendor = table.get(vendor, vendor)
    shown = f"{(manufacturer or '').strip() or '(none)'} / {(model_name or '').strip() or '(none)'}"
    return Scanner(vendor=vendor, scanner=normalise(model_name), as_sent=shown[:128])
