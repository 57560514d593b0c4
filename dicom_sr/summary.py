"""For viewers that do not render SR: a Secondary Capture "AI summary" image and a Key
Object Selection document flagging the analysed images.

The summary is a picture of what the SR says: a banner that it is AI output that
requires review (and, for packs trained on simulated images, not for clinical use), the
conclusion or the review reasons, and per analysed image its key frame with the region
the result refers to drawn on it and the view and finding with their probabilities; the
images not analysed are listed with the reason. Built with highdicom (``SCImage``,
``KeyObjectSelectionDocument``); the drawing is Pillow's. Both objects go into the source
study, each in its own series, and reference nothing outside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import numpy as np
from highdicom import UID as HdUID
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sc import SCImage
from highdicom.sr import ObserverContext
from highdicom.sr.templates import DeviceObserverIdentifyingAttributes
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_sr.builder import (
    DEFAULT_DEVICE_OBSERVER_NAME,
    all_algorithms,
    in_words,
    is_analysed,
    label_text,
)
from dicom_sr.model import ImageResult, QCOutcome, StudyResult

SUMMARY_SERIES_NUMBER = 9002
KEY_OBJECTS_SERIES_NUMBER = 9003
SUMMARY_SERIES_DESCRIPTION = "sononode AI summary - requires review"
KEY_OBJECTS_SERIES_DESCRIPTION = "sononode AI key images"

_WIDTH = 1280
_MARGIN = 16
_TILE = (616, 462)  # two tiles a row, 4:3
_CAPTION_LINES = 4
_MOST_TILES = 8
_BANNER = (150, 20, 20)
_TEXT = (235, 235, 235)
_REGION = (255, 215, 0)
_SECTOR = (0, 200, 220)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _simulated(result: StudyResult) -> bool:
    """The SR's rule: any algorithm of the result (or of one of its classifications)."""
    return any(a.simulated_training_data for a in all_algorithms(result))


def _caption(image: ImageResult, number: int) -> list[str]:
    lines = [f"Image {number}"]
    if image.view is not None:
        lines[0] += f"  View: {label_text(image.view)}"
    if image.finding is not None:
        lines.append(f"Finding: {label_text(image.finding)}")
    notes = [in_words(c.message) for c in image.qc_checks if c.outcome is not QCOutcome.PASS]
    notes += [in_words(r) for r in image.review_reasons]
    lines += [f"- {n}" for n in dict.fromkeys(notes)]
    return lines[:_CAPTION_LINES]


def _wrap(text: str, width: int, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
          draw: ImageDraw.ImageDraw) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return [*lines, line] if line else lines


def render_summary(result: StudyResult, frames: Mapping[str, np.ndarray],
                   *, when: datetime | None = None) -> np.ndarray:
    """The summary picture, ``(rows, 1280, 3)`` uint8 RGB.

    ``frames`` holds, by SOP Instance UID, the key frame of each analysed image
    (``(rows, columns)`` or ``(rows, columns, 3)`` uint8): the frame the SR's region is on.
    An analysed image without a frame here is listed in words only.
    """
    when = when or datetime.now(UTC)
    big, text, small = _font(26), _font(19), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    banner = ["AI RESULT - NOT A DIAGNOSIS - REQUIRES REVIEW BY A RADIOLOGIST"]
    if _simulated(result):
        banner.append("MODELS TRAINED ON SIMULATED IMAGES - NOT FOR CLINICAL USE")
    packs = ", ".join(f"{a.name} {a.version}" for a in all_algorithms(result))
    banner.append(f"sononode, {packs}, {when:%Y-%m-%d %H:%M} UTC")
    if not result.assessable:
        study = ["Study not assessable by the AI:"]
    elif result.conclusion is not None:
        study = [f"AI conclusion: {label_text(result.conclusion)}"]
    else:
        study = []
    if result.needs_review:
        study.append("Requires human review:")
    study += [f"- {in_words(r)}" for r in dict.fromkeys(result.review_reasons)]
    study_lines = [w for line in study for w in _wrap(line, _WIDTH - 2 * _MARGIN, text, probe)]
    shown = [(n, im) for n, im in enumerate(result.images, start=1)
             if is_analysed(im) and im.sop_instance_uid in frames][:_MOST_TILES]
    shown_uids = {im.sop_instance_uid for _, im in shown}
    listed = [f"Image {n}: not analysed - "
              + "; ".join(in_words(r) for r in dict.fromkeys(
                  [c.message for c in im.qc_checks if c.outcome is QCOutcome.FAIL]
                  + list(im.review_reasons))) if not is_analysed(im)
              else f"Image {n}: {label_text(im.view) if im.view else ''} (not drawn)"
              for n, im in enumerate(result.images, start=1)
              if im.sop_instance_uid not in shown_uids]
    tile_rows = (len(shown) + 1) // 2
    caption_h = _CAPTION_LINES * 21 + 8
    height = (_MARGIN + len(banner) * 34 + _MARGIN + len(study_lines) * 24 + _MARGIN
              + tile_rows * (_TILE[1] + caption_h + _MARGIN) + len(listed) * 22 + _MARGIN)
    canvas = Image.new("RGB", (_WIDTH, height), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    top = len(banner) * 34 + 2 * _MARGIN
    draw.rectangle((0, 0, _WIDTH, top - _MARGIN // 2), fill=_BANNER)
    y = _MARGIN
    for line in banner:
        draw.text((_MARGIN, y), line, font=big if y == _MARGIN else text, fill=(255, 255, 255))
        y += 34
    y = top
    for line in study_lines:
        draw.text((_MARGIN, y), line, font=text, fill=_TEXT)
        y += 24
    y += _MARGIN
    for i, (number, image) in enumerate(shown):
        x = _MARGIN + (i % 2) * (_TILE[0] + _MARGIN)
        ty = y + (i // 2) * (_TILE[1] + caption_h + _MARGIN)
        frame = np.asarray(frames[image.sop_instance_uid], dtype=np.uint8)
        picture = Image.fromarray(frame if frame.ndim == 3 else np.stack([frame] * 3, -1))
        scale = min(_TILE[0] / picture.width, _TILE[1] / picture.height)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        canvas.paste(picture.resize(size, Image.Resampling.BILINEAR), (x, ty))
        if image.region is not None:
            c0, r0, c1, r1 = (round(v * scale) for v in image.region)
            colour = _REGION if image.region_localised else _SECTOR
            draw.rectangle((x + c0, ty + r0, x + c1, ty + r1), outline=colour, width=3)
            tag = "AI region" if image.region_localised else "area analysed (not a lesion)"
            anchor = (x + c0 + 4, ty + r0 + 4)
            draw.rectangle(draw.textbbox(anchor, tag, font=small), fill=(0, 0, 0))
            draw.text(anchor, tag, font=small, fill=colour)
        cy = ty + _TILE[1] + 4
        for line in _caption(image, number):
            draw.text((x, cy), line[:80], font=small, fill=_TEXT)
            cy += 21
    y += tile_rows * (_TILE[1] + caption_h + _MARGIN)
    for line in listed:
        draw.text((_MARGIN, y), line[:150], font=small, fill=_TEXT)
        y += 22
    return np.asarray(canvas, dtype=np.uint8)


def build_summary_image(
    reference: Dataset,
    result: StudyResult,
    frames: Mapping[str, np.ndarray],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
    manufacturer: str = "sononode",
) -> Dataset:
    """The Secondary Capture "AI summary" in the study of ``reference`` (a source header:
    patient and study are copied from it), pixels burned in with :func:`render_summary`."""
    pixels = render_summary(result, frames)
    image = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # highdicom asks for one; emptied below
        series_instance_uid=series_instance_uid,
        series_number=SUMMARY_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    # A rendered report has no patient orientation: Type 2, present and empty.
    del image.PatientOrientation
    image.add_new(0x00200020, "CS", None)
    if "Laterality" not in image:  # Type 2C for a paired body part: present, unknown
        image.Laterality = ""
    image.SeriesDescription = SUMMARY_SERIES_DESCRIPTION
    image.BurnedInAnnotation = "YES"
    image.ImageComments = ("AI output requiring review"
                           + (": NOT FOR CLINICAL USE (simulated training data)"
                              if _simulated(result) else ""))
    image.Modality = "OT"
    return image


def build_key_objects(
    sources: Sequence[Dataset],
    result: StudyResult,
    summary: Dataset | None,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int = 1,
    device_observer_uid: str | None = None,
    manufacturer: str = "sononode",
) -> Dataset:
    """A Key Object Selection ("Of Interest") of the analysed images (and the summary
    image, if any), its description the AI's result in one line."""
    analysed = {im.sop_instance_uid for im in result.images if is_analysed(im)}
    chosen = [s for s in sources if str(s.SOPInstanceUID) in analysed]
    if summary is not None:
        chosen.append(summary)
    if not chosen:
        raise ValueError("no analysed image to flag")
    if result.conclusion is not None and result.assessable:
        line = f"AI conclusion: {label_text(result.conclusion)}"
    else:
        line = "AI: study not assessable" if not result.assessable else "AI result"
    line += "; requires review" if result.needs_review else ""
    if _simulated(result):
        line += "; NOT FOR CLINICAL USE (simulated training data)"
    observer = ObserverContext(
        observer_type=pydicom_codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=HdUID(device_observer_uid) if device_observer_uid else HdUID(),
            name=DEFAULT_DEVICE_OBSERVER_NAME))
    content = KeyObjectSelection(
        document_title=pydicom_codes.DCM.OfInterest,
        referenced_objects=chosen,
        observer_device_context=observer,
        description=line[:1024],
    )
    document = KeyObjectSelectionDocument(
        evidence=chosen,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=KEY_OBJECTS_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
    )
    document.SeriesDescription = KEY_OBJECTS_SERIES_DESCRIPTION
    return document
