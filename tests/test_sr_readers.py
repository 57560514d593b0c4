"""Other readers of TID 1500 find the node's results: highdicom's and dcmqi's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest
import sr_fixtures as fx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pcodes
from pydicom.uid import generate_uid

from dicom_sr import build_sr
from dicom_sr.model import StudyResult


def _sr(
    tmp_path: Path, case: Callable[[list[Dataset]], StudyResult] = fx.qc_failed_result
) -> Path:
    sources = fx.make_sources()
    sr = build_sr(sources, case(sources), series_instance_uid=generate_uid(),
                  sop_instance_uid=generate_uid())
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def test_highdicom_finds_every_group_with_its_probability_and_algorithm(tmp_path: Path) -> None:
    sr = hd.sr.srread(_sr(tmp_path, fx.normal_result))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == 3
    for group in groups:
        assert group.roi is not None and group.tracking_uid
        measurements = group.get_measurements()
        assert [m.unit.value for m in measurements] == ["%", "%"]
        assert measurements[0].name.meaning.startswith("View: ")
        assert 0 < measurements[0].value <= 100
        for measurement in measurements:
            names = measurement[0].ContentSequence
            algorithm = [c.TextValue for c in names
                         if c.ConceptNameCodeSequence[0].CodeValue
                         == pcodes.DCM.AlgorithmName.value]
            assert algorithm in (["sononode-view"], ["sononode-finding"])
        views = [q for q in group.get_qualitative_evaluations()
                 if q.name == pcodes.DCM.ImageView]
        assert len(views) == 1


@pytest.mark.dcmtk
def test_dcmqi_tid1500reader_extracts_probabilities_and_algorithms(tmp_path: Path) -> None:
    # dcmqi is a test dependency: its console script lies beside this interpreter (a venv
    # that is not activated has it there, not on PATH).
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    reader = shutil.which("tid1500reader", path=search)
    assert reader is not None, "dcmqi's tid1500reader not found: pip install -e '.[test]'"
    out = tmp_path / "sr.json"
    done = subprocess.run([reader, "--inputDICOM", str(_sr(tmp_path)), "--outputMetadata",
                           str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    metadata = json.loads(out.read_text())
    measurements = metadata["Measurements"]
    assert len(measurements) == 2  # the QC-failed image is a study-level statement
    for group in measurements:
        items = group["measurementItems"]
        assert items and all(i["units"]["CodeValue"] == "%" for i in items)
        assert items[0]["quantity"]["CodeMeaning"].startswith("View: ")
        assert group["measurementAlgorithmIdentification"]["AlgorithmName"] == "sononode-view"
        assert group["measurementAlgorithmIdentification"]["AlgorithmParameters"] == [
            "sha256=" + "a" * 64]


def test_the_sr_is_read_back_by_pydicom(tmp_path: Path) -> None:
    ds = dcmread(_sr(tmp_path))
    assert ds.ContinuityOfContent == "SEPARATE"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"
