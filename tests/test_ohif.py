"""The acceptance test of the SR: OHIF Viewer's own SR code shows the AI result.

Studies go through the node (the real listener over DICOM, then QC, inference and the
report stage in-process); each SR and its source images are then loaded by
``tests/ohif/harness.cjs``, which runs ``@ohif/extension-cornerstone-dicom-sr`` 3.13.13
(with the dcmjs and ``@cornerstonejs/*`` versions that release pins, locked in
``tests/ohif/package-lock.json``) headless under Node.js: the SOP class handler, the
display set's ``load()``, the DICOMSRDisplay annotations and their text boxes, and the
hydration. Every kind of SR the node makes must load as a measurement report, without an
exception, and every analysed image must get an annotation whose text shows its view and
a probability in %.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import require_npm_packages
from inprocess import InProcessNode, in_process_node
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_sr.reader import read_sr
from simulator import simulate_study

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HARNESS = Path(__file__).resolve().parent / "ohif"
SONONET_DIR = Path(os.environ.get(
    "SONONODE_SONONET_DIR", Path(__file__).resolve().parents[2] / "shared" / "sononet"))


def _require_harness() -> None:
    require_npm_packages(HARNESS)


def ohif(*paths: Path) -> dict[str, Any]:
    """What OHIF makes of these files (one study load): the harness's JSON report."""
    done = subprocess.run(
        ["node", "--disable-warning=ExperimentalWarning", str(HARNESS / "harness.cjs"),
         "--compact", *map(str, paths)],
        capture_output=True, text=True, timeout=240, check=False, cwd=HARNESS)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    _require_harness()
    yield from in_process_node(tmp_path_factory.mktemp("node"))


def _simulated(folder: Path, seed: int, *, images: int = 2, loops: int = 1) -> list[Path]:
    simulate_study(folder, seed=seed, vendor="Northwind Medical", n_images=images,
                   n_loops=loops, frames_per_loop=8)
    return sorted(folder.glob("*.dcm"))


def _blank(path: Path, out: Path) -> Path:
    """The image with its pixels black (probe in air): QC fails it."""
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 99
    ds.PixelData = np.zeros(len(ds.PixelData), np.uint8).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _sr_entry(report: dict[str, Any]) -> dict[str, Any]:
    (entry,) = report["srDisplaySets"]
    assert entry["load"]["ok"], entry["load"]
    assert entry["isImagingMeasurementReport"], entry["documentTitle"]
    return entry


def _assert_shown(entry: dict[str, Any], sr: Dataset, sources: list[Path]) -> int:
    """Every analysed image has an annotation whose text box names its view and shows a
    probability in %. Returns how many annotations OHIF made."""
    summary = read_sr(sr)
    analysed = {uid: image for uid, image in summary.images.items() if image.view is not None}
    by_image = {a["referencedSOPInstanceUID"]: a for a in entry["annotations"]}
    source_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    assert set(analysed) <= source_uids
    for uid, image in analysed.items():
        assert uid in by_image, f"no annotation on {uid}: {entry['measurements']}"
        lines = by_image[uid]["textBoxLines"]
        assert image.view is not None and image.view.label is not None
        assert any(image.view.label in line and line.endswith("%") for line in lines), lines
    return len(entry["annotations"])


def test_a_study_of_stills_and_a_loop(node: InProcessNode, tmp_path: Path) -> None:
    files = _simulated(tmp_path / "study", seed=61)
    node.send(files)
    sr_path = node.analyse()
    entry = _sr_entry(ohif(sr_path, *files))
    assert _assert_shown(entry, dcmread(sr_path), files) == len(files)
    loop = next(a for a in entry["annotations"] if a["frameNumber"] is not None)
    assert loop["frameNumber"] >= 1  # on the loop's most confident frame


def test_a_study_with_one_qc_failed_image(node: InProcessNode, tmp_path: Path) -> None:
    files = _simulated(tmp_path / "study", seed=62, loops=0)
    files.append(_blank(files[0], tmp_path / "study" / "blank.dcm"))
    node.send(files)
    sr_path = node.analyse()
    entry = _sr_entry(ohif(sr_path, *files))
    assert _assert_shown(entry, dcmread(sr_path), files) == len(files) - 1
    summary = read_sr(dcmread(sr_path))
    blank_uid = str(dcmread(files[-1], stop_before_pixels=True).SOPInstanceUID)
    assert summary.images[blank_uid].view is None and summary.images[blank_uid].needs_review


def test_a_not_assessable_study(node: InProcessNode, tmp_path: Path) -> None:
    first = _simulated(tmp_path / "source", seed=63, images=2, loops=0)
    files = [_blank(p, tmp_path / f"blank{i}.dcm") for i, p in enumerate(first)]
    node.send(files)
    sr_path = node.analyse()
    entry = _sr_entry(ohif(sr_path, *files))
    assert entry["annotations"] == [] and entry["measurements"] == []
    assert not read_sr(dcmread(sr_path)).assessable


def test_a_superseded_pair_shows_the_latest(node: InProcessNode, tmp_path: Path) -> None:
    files = _simulated(tmp_path / "study", seed=64, images=3, loops=0)
    node.send(files[:2])
    first = node.analyse()
    node.send(files[2:])
    second = node.analyse()
    (entry,) = ohif(first, second, *files)["srDisplaySets"]
    assert entry["chosenInstance"]["SOPInstanceUID"] == str(dcmread(second).SOPInstanceUID)
    assert entry["load"]["ok"]
    assert _assert_shown(entry, dcmread(second), files) == 3


@pytest.fixture(scope="module")
def sononet_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    _require_harness()
    npz = SONONET_DIR / "SonoNet16.npz"
    if not npz.is_file():
        pytest.skip(f"SonoNet weights not found at {npz}")
    from modelkit.sononet_import import import_sononet

    pack = import_sononet(npz, tmp_path_factory.mktemp("packs") / "sononet16",
                          examples=SONONET_DIR / "example_images")
    yield from in_process_node(tmp_path_factory.mktemp("sononet-node"), model_packs=[pack])


def test_a_sononet_study_with_localised_planes(sononet_node: InProcessNode,
                                               tmp_path: Path) -> None:
    from test_sononet_e2e import _study

    _, files_by_name = _study(tmp_path / "study")
    files = list(files_by_name.values())
    sononet_node.send(files)
    sr_path = sononet_node.analyse()
    entry = _sr_entry(ohif(sr_path, *files))
    assert _assert_shown(entry, dcmread(sr_path), files) == len(files)
    summary = read_sr(dcmread(sr_path))
    for image in summary.images.values():
        assert image.comment is not None and "not a lesion outline" not in image.comment
