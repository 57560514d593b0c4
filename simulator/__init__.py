"""Ultrasound B-mode simulator: views, findings, fictional vendor styles, DICOM studies.

Images are formed from tissue maps with speckle, attenuation, shadowing and scan
conversion, styled by fictional vendors, with ground truth for view, thyroid nodule,
lung pattern, image quality and the scan region. See :func:`simulate_image`,
:func:`simulate_loop` and :func:`simulate_study`.
"""

from __future__ import annotations

from simulator.dicom import (
    TRANSFER_SYNTAXES,
    StudyContext,
    build_instance,
    new_study_context,
    resolve_transfer_syntax,
    write_instance,
)
from simulator.simulate import SimFrame, simulate_image, simulate_loop
from simulator.study import InstanceLabel, SimulatedStudy, simulate_study
from simulator.vendors import (
    ACQUISITION_CHANGES,
    HELD_OUT_VENDOR,
    TRAINING_VENDORS,
    VENDOR_STYLES,
    VendorStyle,
    acquisition_change,
)
from simulator.views import VIEWS, LungPattern, NoduleClass, View

__all__ = [
    "ACQUISITION_CHANGES",
    "HELD_OUT_VENDOR",
    "TRAINING_VENDORS",
    "TRANSFER_SYNTAXES",
    "VENDOR_STYLES",
    "VIEWS",
    "InstanceLabel",
    "LungPattern",
    "NoduleClass",
    "SimFrame",
    "SimulatedStudy",
    "StudyContext",
    "VendorStyle",
    "View",
    "acquisition_change",
    "build_instance",
    "new_study_context",
    "resolve_transfer_syntax",
    "simulate_image",
    "simulate_loop",
    "simulate_study",
    "write_instance",
]
