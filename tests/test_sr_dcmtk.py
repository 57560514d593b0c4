"""Written SRs pass dciodvfy and dsrdump shows what a radiologist must see."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sr_fixtures as fx
from pydicom.uid import generate_uid

from dicom_sr import build_sr, codes

pytestmark = pytest.mark.dcmtk

CASES = {
    "normal": fx.normal_result,
    "review": fx.review_result,
    "qc_failed": fx.qc_failed_result,
    "not_assessable": fx.not_assessable_result,
    "simulated": fx.simulated_result,
}

# dciodvfy does not know the private coding scheme; the SR declares it in the
# Coding Scheme Identification Sequence, so this warning is expected. IHE AIR asks for a
# Device UID in each Contributing Equipment item (the model pack); this dicom3tools does
# not list it in that macro and calls the SOP class "Standard Extended" for it.
EXPECTED_WARNINGS = (
    "Unrecognized defined term <99SONONODE>",
    "(0x0018,0x1002) UI Device UID",
    "this is a Standard Extended SOP Class",
)


def _write(tmp_path: Path, case: str, **kw: Any) -> Path:
    sources = fx.make_sources()
    sr = build_sr(sources, CASES[case](sources), series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid(), **kw)
    path = tmp_path / f"{case}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def _run(*args: str | Path) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


@pytest.fixture
def dciodvfy() -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    return exe


@pytest.fixture
def dsrdump() -> str:
    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.skip("dsrdump (DCMTK) not installed")
    return exe


@pytest.mark.parametrize("case", sorted(CASES))
def test_dciodvfy_reports_no_error(tmp_path: Path, dciodvfy: str, case: str) -> None:
    output = _run(dciodvfy, _write(tmp_path, case))
    assert "Comprehensive3DSR" in output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == []
    unexpected = [
        line for line in output.splitlines()
        if line.startswith("Warning") and not any(w in line for w in EXPECTED_WARNINGS)
    ]
    assert unexpected == []


def test_dciodvfy_superseding_sr(tmp_path: Path, dciodvfy: str) -> None:
    sources = fx.make_sources()
    series = generate_uid()
    first = build_sr(sources, fx.review_result(sources), series_instance_uid=series,
                     sop_instance_uid=generate_uid())
    second = build_sr(sources, fx.normal_result(sources), series_instance_uid=series,
                      sop_instance_uid=generate_uid(), instance_number=2,
                      previous_versions=[first])
    path = tmp_path / "second.dcm"
    second.save_as(path, enforce_file_format=True)
    output = _run(dciodvfy, path)
    assert [line for line in output.splitlines() if line.startswith("Error")] == []


def test_dsrdump_shows_view_finding_and_probability(tmp_path: Path, dsrdump: str) -> None:
    output = _run(dsrdump, "+Pl", _write(tmp_path, "normal"))
    assert '"Four chamber view"' in output
    assert '"Transverse abdominal view"' in output
    assert '(17621005,SCT,"Normal")' in output
    assert '(,,"Finding: Normal (probability)")="87.0" (%,UCUM,"Percent")' in output
    assert '"Algorithm Parameters")="sha256=' + "b" * 64 in output
    assert "AI conclusion: Normal 90.0 %" in output
    assert "3 of 3 image(s) analysed" in output
    # Probabilities to 0.1 %, no long decimals, no internal reason codes.
    assert "87.0000" not in output and "saturated:" not in output


def test_dsrdump_shows_review_with_the_best_guess_marked(tmp_path: Path, dsrdump: str) -> None:
    output = _run(dsrdump, "+Pl", _write(tmp_path, "review"))
    assert '"Finding: Abnormal (NOT CONFIDENT, review)")="41.0"' in output
    assert "REQUIRES HUMAN REVIEW: Image 2: low confidence: 0.41 below threshold 0.70" in output
    assert '"Outside what the AI models were trained on"' in output  # the OOD loop
    assert output.count(codes.SIMULATED_DISCLAIMER) == 0


def test_dsrdump_shows_not_assessable(tmp_path: Path, dsrdump: str) -> None:
    output = _run(dsrdump, "+Pl", _write(tmp_path, "not_assessable"))
    assert '"Not assessable by the AI models"' in output
    assert "Study NOT ASSESSABLE by the AI models" in output
    assert '(,,"Finding")' not in output


def test_dsrdump_shows_simulated_disclaimer(tmp_path: Path, dsrdump: str) -> None:
    output = _run(dsrdump, "+Pl", _write(tmp_path, "simulated"))
    assert '"Imaging Measurement Report"' in output  # the standard title, always
    assert output.count(codes.SIMULATED_DISCLAIMER) == 1
    assert "sononode-sim" + codes.SIMULATED_SUFFIX in output
