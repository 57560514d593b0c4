"""Drift of inputs and outputs by vendor, scanner and model pack.

- :mod:`node.drift.vendors`: the normalised vendor and scanner a stream is kept for;
- :mod:`node.drift.signals`: what is watched, per image and per study;
- :mod:`node.drift.reference`: what it is compared with, fitted with a split for its
  thresholds (stored in the pack, or frozen as a site baseline);
- :mod:`node.drift.monitor`: the sequential test of each stream, updated per study;
- :mod:`node.drift.report`: what ``/drift``, the dashboard and Prometheus show.
"""

from node.drift.monitor import Status, StreamStatus, observe
from node.drift.report import drift_metric_families, drift_report, vendor_report

__all__ = [
    "Status",
    "StreamStatus",
    "drift_metric_families",
    "drift_report",
    "observe",
    "vendor_report",
]
