"""The code stays ruff-clean and type-checks: CI runs these with the rest of the suite.

ruff and mypy are test dependencies (``pip install -e '.[test]'``), so a missing one is
a failure here, not a skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Strictly typed: the packages that ship, the benchmarks and the tests.
TYPED = ("node", "workers", "dicom_sr", "simulator", "modelkit", "harness", "bench", "tests")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_is_clean() -> None:
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    done = _run("mypy", *TYPED)
    assert done.returncode == 0, done.stdout + done.stderr
