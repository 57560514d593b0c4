"""Drift of inputs and outputs by ultrasound vendor.

For each vendor the earliest ``window`` analysed images form the reference window and
the latest ``window`` the recent one; the population stability index (PSI) compares
them for an input statistic (mean grey level of the scan region), the calibrated
confidence of the view and the distribution of predicted views. PSI above 0.2 is the
usual "significant shift" rule of thumb; the gauges let IT alert on it per vendor.
Written by hand: a few lines of numpy, and no monitoring library computes PSI from
our index rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select

from node.db import Database, ImageResultRow

DEFAULT_WINDOW = 200
#: PSI above which a feature counts as shifted (the usual rule of thumb).
PSI_ALERT = 0.2
MIN_IMAGES = 20
_EPS = 1e-4


def psi(reference: np.ndarray, recent: np.ndarray) -> float:
    """Population stability index of two histograms (counts or proportions)."""
    ref = reference / max(reference.sum(), 1)
    new = recent / max(recent.sum(), 1)
    ref = np.clip(ref, _EPS, None)
    new = np.clip(new, _EPS, None)
    return float(np.sum((new - ref) * np.log(new / ref)))


def _numeric_psi(ref: Sequence[float | None], new: Sequence[float | None], *,
                 edges: np.ndarray | None = None) -> float | None:
    ref_a = np.asarray([v for v in ref if v is not None], dtype=float)
    new_a = np.asarray([v for v in new if v is not None], dtype=float)
    if len(ref_a) < MIN_IMAGES // 2 or len(new_a) < MIN_IMAGES // 2:
        return None
    if edges is None:
        edges = np.unique(np.quantile(ref_a, np.linspace(0, 1, 11)))
        if len(edges) < 3:
            edges = np.linspace(ref_a.min() - 1, ref_a.max() + 1, 11)
        edges = np.concatenate(([-np.inf], edges[1:-1], [np.inf]))
    return psi(np.histogram(ref_a, edges)[0].astype(float),
               np.histogram(new_a, edges)[0].astype(float))


def _categorical_psi(ref: Sequence[str | None], new: Sequence[str | None]) -> float | None:
    if len(ref) < MIN_IMAGES // 2 or len(new) < MIN_IMAGES // 2:
        return None
    labels = sorted({str(v) for v in (*ref, *new)})
    r = np.array([sum(1 for v in ref if str(v) == label) for label in labels], dtype=float)
    n = np.array([sum(1 for v in new if str(v) == label) for label in labels], dtype=float)
    return psi(r, n)


def compute_drift(db: Database, *, window: int = DEFAULT_WINDOW) -> list[dict[str, Any]]:
    """Per vendor: image count and PSI of each monitored feature (None when too few images)."""
    with db.session() as session:
        vendors = [v for (v,) in session.execute(
            select(ImageResultRow.manufacturer).distinct()).all()]
        out = []
        for vendor in sorted(vendors):
            base = select(ImageResultRow).where(ImageResultRow.manufacturer == vendor)
            first = session.scalars(base.order_by(ImageResultRow.id).limit(window)).all()
            last = session.scalars(base.order_by(ImageResultRow.id.desc()).limit(window)).all()
            total = len({r.id for r in first} | {r.id for r in last})
            entry: dict[str, Any] = {"vendor": vendor, "images": total, "psi": {}}
            if total >= MIN_IMAGES:
                # With fewer than two windows' worth of images, split what there is in halves.
                rows = sorted({r.id: r for r in (*first, *last)}.values(), key=lambda r: r.id)
                if total < 2 * window:
                    half = len(rows) // 2
                    ref_rows, new_rows = rows[:half], rows[half:]
                else:
                    ref_rows, new_rows = list(first), list(reversed(last))
                entry["psi"] = {
                    "input_mean_intensity": _numeric_psi(
                        [r.mean_intensity for r in ref_rows], [r.mean_intensity for r in new_rows]),
                    "view_confidence": _numeric_psi(
                        [r.view_probability for r in ref_rows],
                        [r.view_probability for r in new_rows],
                        edges=np.array([-np.inf, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, np.inf])),
                    "view_distribution": _categorical_psi(
                        [r.view_label for r in ref_rows], [r.view_label for r in new_rows]),
                    "review_rate": _categorical_psi(
                        [str(r.needs_review) for r in ref_rows],
                        [str(r.needs_review) for r in new_rows]),
                }
            out.append(entry)
        return out


def drift_metric_families(db: Database) -> Iterator[GaugeMetricFamily]:
    """Prometheus gauges: ``sononode_drift_psi{vendor,feature}`` and images per vendor."""
    gauge = GaugeMetricFamily(
        "sononode_drift_psi",
        "Population stability index, recent vs reference window, by vendor and feature.",
        labels=["vendor", "feature"],
    )
    images = GaugeMetricFamily("sononode_drift_images", "Analysed images per vendor.",
                               labels=["vendor"])
    for entry in compute_drift(db):
        images.add_metric([entry["vendor"]], float(entry["images"]))
        for feature, value in entry["psi"].items():
            if value is not None:
                gauge.add_metric([entry["vendor"], feature], value)
    yield gauge
    yield images
