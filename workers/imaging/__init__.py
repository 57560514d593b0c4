"""Image analysis of received instances, before any model sees them.

:mod:`~workers.imaging.types` (the in-memory types shared with inference),
:mod:`~workers.imaging.pixels` (decoding to 8-bit RGB with pydicom's handlers, the one grey
conversion and frame sampler), :mod:`~workers.imaging.scan_region` (the scan region found by
fitting the probe's geometry) and :mod:`~workers.imaging.qc` (per-frame, per-loop and
study-level quality control with reason codes).
"""
