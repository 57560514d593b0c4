"""Shared helpers of the benchmarks (real peers come from the installed ``harness``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from harness.peers import dcmsend, make_orthanc, start_node, wait_for

__all__ = ["ROOT", "dcmsend", "epoch_seconds", "make_orthanc", "percentile", "start_node",
           "wait_for"]

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def epoch_seconds(text: str) -> float:
    """Epoch seconds of one of the API's UTC timestamps (ISO 8601, ``Z`` or naive)."""
    return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=UTC).timestamp()
