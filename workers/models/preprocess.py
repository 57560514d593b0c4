"""What the network sees: the one pre-processing that serving and training both call.

A pack's :class:`~workers.models.manifest.InputSpec` declares its input beside its weights
(as torchvision declares the transforms of a set of weights); this module turns a decoded,
quality-controlled frame into exactly that input:

1. :func:`model_input`: the pixels the pack looks at, grey in ``[0, 1]``: for
   ``scan_region`` packs the bounding box of QC's scan region with everything outside the
   sector mask set to zero (:func:`frame_for_model`), or, for a frame of a capture layout
   the pack declares, that layout's fixed crop as its weights were trained
   (:func:`layout_crop`); for ``full_frame`` packs the frame;
2. :func:`preprocess`: resized (bilinear, antialiased) to the pack's input size and
   normalised (:func:`normalise`) into an ``(N, C, H, W)`` tensor.

Training (:mod:`modelkit.data`) stores step 1 and the resize as 8-bit frames and normalises
in the training loop with the same :func:`normalise`; a crop that differed from the node's
(an unmasked box, another grey conversion) would silently cost accuracy in use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from workers.imaging.pixels import grey_frames
from workers.imaging.types import Box
from workers.models.manifest import InputSpec, NormalisationMode, Region

if TYPE_CHECKING:
    from workers.imaging.types import DecodedInstance, InstanceQC, PreparedInstance
    from workers.models.manifest import CaptureLayout

logger = logging.getLogger(__name__)

#: A scan region narrower or lower than this is ignored (the whole frame is used).
MIN_REGION_PIXELS = 8
#: A capture layout's fixed crop is used only where QC's scan region covers at least this
#: fraction of it: a frame of the same size from another display, whose image lies
#: elsewhere, keeps QC's region. Not more: a sector dark at one side gives a smaller
#: region (0.88 of the crop on the SonoNet authors' 4CH capture).
LAYOUT_MIN_COVER = 0.5


def to_unit_grey(frame: np.ndarray) -> np.ndarray:
    """Return ``frame`` as a float32 ``(H, W)`` grey image in ``[0, 1]``.

    Accepts ``uint8`` grey ``(H, W)`` or RGB ``(H, W, 3)`` (grey = channel mean, scaled by
    1/255) and floating grey images already in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the shape is wrong, the image empty or a float image is outside ``[0, 1]``.
    """
    array = np.asarray(frame)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        grey = grey_frames(array[None, ..., :3])[0]
        array = grey / 255.0 if array.dtype == np.uint8 else grey
    elif array.ndim != 2:
        raise ValueError(f"expected a grey (H, W) or RGB (H, W, 3) frame, got shape {array.shape}")
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.size == 0 or min(array.shape[:2]) < 2:
        raise ValueError(f"frame too small: shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1.0 + 1e-3 or not math.isfinite(high):
        raise ValueError(
            f"float frames must hold grey values in [0, 1], got range [{low:.3g}, {high:.3g}] "
            "(divide 8-bit values by 255)"
        )
    return array


def resize(grey: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """A ``(1, 1, H, W)`` tensor of a grey ``[0, 1]`` frame at the spec's input size."""
    tensor = torch.from_numpy(np.ascontiguousarray(to_unit_grey(grey)))[None, None]
    if tuple(tensor.shape[2:]) == (spec.height, spec.width):
        return tensor
    return F.interpolate(
        tensor, size=(spec.height, spec.width), mode="bilinear", antialias=True,
        align_corners=False,
    )


def preprocess(frames: Sequence[np.ndarray], spec: InputSpec) -> torch.Tensor:
    """Stack frames into the network input ``(N, C, H, W)`` float32 tensor.

    Each frame is converted with :func:`to_unit_grey`, resized (:func:`resize`), normalised
    and replicated to the spec's channel count (:func:`normalise`).
    """
    tensors = [resize(frame, spec) for frame in frames]
    batch = torch.cat(tensors) if tensors else torch.zeros(0, 1, spec.height, spec.width)
    return normalise(batch, spec)


def normalise(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Normalise a ``(N, 1, H, W)`` batch in ``[0, 1]`` as the spec says."""
    if spec.normalisation is NormalisationMode.PER_IMAGE:
        mean = batch.mean(dim=(1, 2, 3), keepdim=True)
        std = batch.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        batch = (batch - mean) / std
    else:
        batch = (batch - spec.mean) / spec.std
    if spec.channels == 3:
        batch = batch.expand(-1, 3, -1, -1)
    return batch


# ----------------------------------------------------------------------------------------
# The pixels a pack looks at
# ----------------------------------------------------------------------------------------
def grey_frame(instance: DecodedInstance, index: int) -> np.ndarray:
    """Frame ``index`` of ``instance`` as float32 grey in ``[0, 1]`` (channel mean)."""
    grey: np.ndarray = grey_frames(instance.frames[index : index + 1])[0] / np.float32(255.0)
    return grey


def clipped_region(qc: InstanceQC, shape: tuple[int, ...]) -> Box | None:
    """QC's scan region clipped to a frame of ``shape``; ``None`` when absent or tiny."""
    if qc.scan_region is None:
        return None
    c0, r0, c1, r1 = qc.scan_region
    rows, cols = shape[:2]
    c0, c1 = max(0, c0), min(cols, c1)
    r0, r1 = max(0, r0), min(rows, r1)
    if c1 - c0 < MIN_REGION_PIXELS or r1 - r0 < MIN_REGION_PIXELS:
        return None
    return c0, r0, c1, r1


def layout_crop(item: PreparedInstance, layouts: Sequence[CaptureLayout]) -> Box | None:
    """The fixed crop of the first of ``layouts`` that ``item``'s frames have, or ``None``.

    A layout applies to frames of its exact size whose image lies where its crop is: QC's
    scan region (when QC found one) covers at least :data:`LAYOUT_MIN_COVER` of the crop.
    """
    rows, cols = item.instance.frames.shape[1:3]
    for layout in layouts:
        if (layout.rows, layout.columns) != (rows, cols):
            continue
        c0, r0, c1, r1 = layout.crop
        region = item.qc.scan_region
        if region is not None:
            overlap = max(0, min(c1, region[2]) - max(c0, region[0])) * max(
                0, min(r1, region[3]) - max(r0, region[1])
            )
            if overlap < LAYOUT_MIN_COVER * (c1 - c0) * (r1 - r0):
                logger.debug(
                    "%s: %d x %d frame of a known capture layout, but its scan region %s "
                    "lies elsewhere: not using the layout's crop",
                    item.instance.sop_instance_uid, rows, cols, region,
                )
                continue
        return layout.crop
    return None


def input_box(
    item: PreparedInstance, region: Region, layouts: Sequence[CaptureLayout] = ()
) -> Box:
    """The part of the frame a pack with input ``region`` (and capture ``layouts``) sees,
    in frame pixels."""
    rows, cols = item.instance.frames.shape[1:3]
    box = None
    if region is Region.SCAN_REGION:
        box = layout_crop(item, layouts) or clipped_region(item.qc, (rows, cols))
    return box if box is not None else (0, 0, int(cols), int(rows))


def frame_for_model(inst: DecodedInstance, qc: InstanceQC, index: int) -> np.ndarray:
    """Grey float32 crop (``[0, 1]``) of the scan region's bounding box for one usable frame,
    zero outside the region mask: a ``scan_region`` pack's input before resizing.

    Raises
    ------
    ValueError
        If ``index`` is not among ``qc.usable_frames`` or QC found no scan region.
    """
    if index not in qc.usable_frames:
        raise ValueError(f"frame {index} is not usable (usable: {qc.usable_frames})")
    if qc.scan_region is None or qc.scan_mask is None:
        raise ValueError("QC found no scan region")
    c0, r0, c1, r1 = qc.scan_region
    crop = grey_frames(inst.frames[index : index + 1, r0:r1, c0:c1])[0]
    crop[~qc.scan_mask[r0:r1, c0:c1]] = 0.0
    unit: np.ndarray = crop / np.float32(255.0)
    return unit


def model_input(
    item: PreparedInstance, index: int, region: Region, layouts: Sequence[CaptureLayout] = ()
) -> np.ndarray:
    """Grey float32 frame in ``[0, 1]`` that a pack with input ``region`` is shown.

    ``scan_region``: the fixed crop of a capture layout the frame has (:func:`layout_crop`,
    unmasked, as the pack was trained), else :func:`frame_for_model` when QC found a region
    and its mask, else the unmasked crop of QC's box, else the whole frame. ``full_frame``:
    the whole frame.
    """
    if region is Region.FULL_FRAME:
        return grey_frame(item.instance, index)
    fixed = layout_crop(item, layouts)
    if fixed is not None:
        return _grey_crop(item.instance, index, fixed)
    if item.qc.scan_region is not None and item.qc.scan_mask is not None:
        try:
            return frame_for_model(item.instance, item.qc, index)
        except (ValueError, IndexError) as exc:
            logger.warning(
                "masked crop failed on %s frame %d (%s); cropping the scan region",
                item.instance.sop_instance_uid, index, exc,
            )
    box = clipped_region(item.qc, item.instance.frames.shape[1:3])
    if box is None:
        return grey_frame(item.instance, index)
    return _grey_crop(item.instance, index, box)


def _grey_crop(instance: DecodedInstance, index: int, box: Box) -> np.ndarray:
    """Frame ``index`` of ``instance`` cropped to ``box``, unmasked, grey in ``[0, 1]``."""
    c0, r0, c1, r1 = box
    crop: np.ndarray = grey_frames(instance.frames[index : index + 1, r0:r1, c0:c1])[0]
    return crop / np.float32(255.0)
