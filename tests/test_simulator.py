"""Tests of the ultrasound B-mode simulator (workers/simulator)."""

from __future__ import annotations

import csv
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import stats

from simulator import (
    HELD_OUT_VENDOR,
    TRANSFER_SYNTAXES,
    VENDOR_STYLES,
    VIEWS,
    SimFrame,
    new_study_context,
    simulate_image,
    simulate_loop,
    simulate_study,
    write_instance,
)
from simulator.bmode import speckle_envelope
from simulator.cli import main
from simulator.views import sample_nodule_features

GREY_VENDOR = "Northwind Medical"
TINT_VENDOR = "Aurora Imaging"
LOSSLESS = {"implicit", "explicit", "deflated", "big-endian", "rle", "jpeg-ls", "j2k"}


def _grey(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64).mean(axis=-1) if pixels.ndim == 3 else pixels.astype(float)


def test_public_constants() -> None:
    assert VIEWS == (
        "abdomen",
        "thyroid_transverse",
        "thyroid_longitudinal",
        "cardiac_4ch",
        "lung",
    )
    assert len(VENDOR_STYLES) >= 5
    assert HELD_OUT_VENDOR in VENDOR_STYLES
    assert len({s.model_name for s in VENDOR_STYLES.values()}) == len(VENDOR_STYLES)


@pytest.mark.parametrize("view", VIEWS)
def test_deterministic_for_a_seed(view: str) -> None:
    a = simulate_image(view, vendor=TINT_VENDOR, rng=np.random.default_rng(7), size=(128, 160))
    b = simulate_image(view, vendor=TINT_VENDOR, rng=np.random.default_rng(7), size=(128, 160))
    c = simulate_image(view, vendor=TINT_VENDOR, rng=np.random.default_rng(8), size=(128, 160))
    assert np.array_equal(a.pixels, b.pixels)
    assert a.labels == b.labels
    assert a.scan_bbox == b.scan_bbox
    assert not np.array_equal(a.pixels, c.pixels)


def test_frame_contract() -> None:
    f = simulate_image("thyroid_transverse", vendor=GREY_VENDOR, rng=np.random.default_rng(1))
    assert isinstance(f, SimFrame)
    assert f.pixels.shape == (480, 640) and f.pixels.dtype == np.uint8
    assert f.scan_mask.shape == (480, 640) and f.scan_mask.dtype == bool
    assert set(f.labels) == {"view", "nodule", "lung_pattern", "quality", "vendor"}
    assert f.labels["nodule"] in {"none", "benign", "malignant"}
    assert f.labels["lung_pattern"] is None
    assert 0.0 <= float(f.labels["quality"]) <= 1.0  # type: ignore[arg-type]
    tinted = simulate_image("lung", vendor=TINT_VENDOR, rng=np.random.default_rng(1))
    assert tinted.pixels.shape == (480, 640, 3)
    assert tinted.labels["lung_pattern"] in {"normal", "b_lines", "consolidation"}
    assert tinted.labels["nodule"] is None


def test_label_validation() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="thyroid"):
        simulate_image("abdomen", vendor=GREY_VENDOR, rng=rng, nodule="benign")
    with pytest.raises(ValueError, match="lung"):
        simulate_image("thyroid_transverse", vendor=GREY_VENDOR, rng=rng, lung_pattern="normal")
    with pytest.raises(ValueError, match="unknown vendor"):
        simulate_image("lung", vendor="Acme", rng=rng)
    with pytest.raises(ValueError, match="unknown view"):
        simulate_image("brain", vendor=GREY_VENDOR, rng=rng)
    with pytest.raises(ValueError, match="quality"):
        simulate_image("lung", vendor=GREY_VENDOR, rng=rng, quality=1.5)
    f = simulate_image("lung", vendor=GREY_VENDOR, rng=rng, lung_pattern="b_lines", quality=0.3)
    assert f.labels["lung_pattern"] == "b_lines"
    assert f.labels["quality"] == pytest.approx(0.3)
    assert f.findings["degradations"]


def test_speckle_envelope_is_rayleigh() -> None:
    rng = np.random.default_rng(3)
    env = speckle_envelope(
        np.full((384, 384), 2.0, np.float32), rng=rng, axial_sigma=1.5, lateral_sigma=2.0
    )
    v = env[20:-20, 20:-20].ravel().astype(np.float64)
    # Mean intensity is preserved and the speckle SNR is that of a Rayleigh law (1.91).
    assert np.mean(v**2) == pytest.approx(2.0, rel=0.08)
    assert v.mean() / v.std() == pytest.approx(np.sqrt(np.pi / (4 - np.pi)), rel=0.05)
    scale = np.sqrt(np.mean(v**2) / 2)
    d = stats.kstest(v, "rayleigh", args=(0, scale)).statistic
    assert d < 0.03
    # ...and clearly not, say, a Gaussian of the same mean and spread.
    assert stats.kstest(v, "norm", args=(v.mean(), v.std())).statistic > d


def test_views_are_separable() -> None:
    """A nearest-centroid classifier on tiny images tells the five views apart."""

    def feats(seed: int, view: str) -> np.ndarray:
        vendor = list(VENDOR_STYLES)[seed % 4]
        f = simulate_image(
            view,
            vendor=vendor,
            rng=np.random.default_rng(seed),
            size=(96, 128),
            overlays=False,
            quality=0.95,
        )
        g = _grey(f.pixels)
        small = g.reshape(24, 4, 32, 4).mean(axis=(1, 3)) / 255.0
        return np.concatenate(
            [small.ravel(), f.scan_mask.reshape(24, 4, 32, 4).mean((1, 3)).ravel()]
        )

    train = {v: np.mean([feats(s, v) for s in range(8)], axis=0) for v in VIEWS}
    correct = total = 0
    for v in VIEWS:
        for s in range(100, 106):
            x = feats(s, v)
            pred = min(train, key=lambda k: float(np.sum((train[k] - x) ** 2)))
            correct += pred == v
            total += 1
    assert correct / total >= 0.8


def test_vendor_styles_differ() -> None:
    def stats_of(vendor: str) -> np.ndarray:
        out = []
        for seed in range(3):
            f = simulate_image(
                "abdomen",
                vendor=vendor,
                rng=np.random.default_rng(seed),
                size=(240, 320),
                overlays=False,
                quality=0.95,
            )
            px = f.pixels.astype(np.float64)
            inside = px[f.scan_mask]
            g = inside.mean(axis=-1) if inside.ndim == 2 else inside
            tint = (inside[:, 0].mean() - inside[:, 2].mean()) if inside.ndim == 2 else 0.0
            gy = _grey(f.pixels)
            grad = np.abs(np.diff(gy, axis=1))[f.scan_mask[:, 1:] & f.scan_mask[:, :-1]].mean()
            c0, r0, c1, _r1 = f.scan_bbox
            out.append([g.mean(), g.std(), tint, grad, c0 / 320, (c1 - c0) / 320, r0 / 240])
        return np.mean(out, axis=0)

    table = {v: stats_of(v) for v in VENDOR_STYLES}
    names = list(table)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = np.abs(table[a] - table[b]) / (np.abs(table[a]) + np.abs(table[b]) + 1e-9)
            assert diff.max() > 0.08, (a, b, table[a], table[b])
    assert abs(table[TINT_VENDOR][2]) > 5  # sepia: red above blue
    assert table[GREY_VENDOR][2] == 0.0


@pytest.mark.parametrize("view", VIEWS)
def test_scan_mask_matches_non_black_area(view: str) -> None:
    f = simulate_image(
        view, vendor=GREY_VENDOR, rng=np.random.default_rng(11), size=(200, 260), overlays=False
    )
    nonblack = f.pixels > 0
    assert not np.any(nonblack & ~f.scan_mask)
    assert nonblack[f.scan_mask].mean() > 0.6
    rows = np.flatnonzero(f.scan_mask.any(axis=1))
    cols = np.flatnonzero(f.scan_mask.any(axis=0))
    assert f.scan_bbox == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    nb_rows = np.flatnonzero(nonblack.any(axis=1))
    nb_cols = np.flatnonzero(nonblack.any(axis=0))
    box = (nb_cols[0], nb_rows[0], nb_cols[-1] + 1, nb_rows[-1] + 1)
    assert np.max(np.abs(np.subtract(box, f.scan_bbox))) <= 3
    # With the UI on, what lies outside the region is a little text and ruler only.
    g = simulate_image(
        view, vendor=GREY_VENDOR, rng=np.random.default_rng(11), size=(200, 260), overlays=True
    )
    assert np.array_equal(g.scan_mask, f.scan_mask)
    outside = (g.pixels > 0) & ~g.scan_mask
    assert 0 < outside.mean() < 0.1


def test_loop_moves_and_keeps_labels() -> None:
    frames = simulate_loop(
        "cardiac_4ch",
        vendor=GREY_VENDOR,
        rng=np.random.default_rng(2),
        n_frames=6,
        size=(128, 160),
        overlays=False,
    )
    assert len(frames) == 6
    assert all(f.labels == frames[0].labels for f in frames)
    times = [f.acquisition["time_s"] for f in frames]
    assert times == sorted(times) and times[1] > 0
    diffs = [
        np.abs(_grey(a.pixels) - _grey(b.pixels)).mean() for a, b in itertools.pairwise(frames)
    ]
    assert min(diffs) > 0.5
    with pytest.raises(ValueError, match="n_frames"):
        simulate_loop("lung", vendor=GREY_VENDOR, rng=np.random.default_rng(0), n_frames=0)


def test_nodule_features_follow_tirads_tendencies() -> None:
    rng = np.random.default_rng(5)
    ben = [sample_nodule_features("benign", rng) for _ in range(400)]
    mal = [sample_nodule_features("malignant", rng) for _ in range(400)]

    def frac(items: list[dict[str, object]], key: str, values: set[str]) -> float:
        return float(np.mean([it[key] in values for it in items]))

    assert frac(mal, "composition", {"solid"}) > frac(ben, "composition", {"solid"}) + 0.3
    hypo = {"hypoechoic", "very_hypoechoic"}
    assert frac(mal, "echogenicity", hypo) > frac(ben, "echogenicity", hypo) + 0.3
    assert frac(mal, "shape", {"taller_than_wide"}) > frac(ben, "shape", {"taller_than_wide"})
    assert frac(mal, "echogenic_foci", {"punctate"}) > frac(ben, "echogenic_foci", {"punctate"})
    mean_pts = (
        np.mean([m["tirads_points"] for m in mal]),
        np.mean([b["tirads_points"] for b in ben]),
    )
    assert mean_pts[0] > mean_pts[1] + 2
    # Overlapping, not trivially separable: some benign nodules score high and vice versa.
    assert any(b["tirads_level"] in {"TR4", "TR5"} for b in ben)
    assert any(m["tirads_level"] in {"TR1", "TR2", "TR3"} for m in mal)


@pytest.fixture(scope="module")
def sample_frames() -> dict[str, list[SimFrame]]:
    out = {}
    for vendor in (GREY_VENDOR, TINT_VENDOR):
        rng = np.random.default_rng(4)
        out[vendor] = simulate_loop(
            "thyroid_transverse", vendor=vendor, rng=rng, n_frames=2, size=(120, 160)
        )
    return out


def _write(
    frames: list[SimFrame] | SimFrame, path: Path, vendor: str, ts: str, pm: str | None = None
) -> pydicom.Dataset:
    study = new_study_context(np.random.default_rng(0), vendor=vendor)
    return write_instance(
        frames,
        path,
        vendor=vendor,
        study=study,
        series_instance_uid="2.25.1234",
        transfer_syntax=ts,
        photometric=pm,
    )


@pytest.mark.parametrize("ts", list(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("vendor", [GREY_VENDOR, TINT_VENDOR])
def test_transfer_syntax_round_trip(
    ts: str, vendor: str, sample_frames: dict[str, list[SimFrame]], tmp_path: Path
) -> None:
    frames = sample_frames[vendor]
    for item, name in ((frames[0], "single.dcm"), (frames, "multi.dcm")):
        _write(item, tmp_path / name, vendor, ts)
        ds = pydicom.dcmread(tmp_path / name)
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[ts]
        arr = ds.pixel_array
        ref = np.stack([f.pixels for f in frames]) if isinstance(item, list) else item.pixels
        assert arr.shape == ref.shape
        err = np.abs(arr.astype(int) - ref.astype(int))
        if ts in LOSSLESS:
            assert err.max() == 0
            assert ds.get("LossyImageCompression", "00") == "00"
        else:
            assert ds.LossyImageCompression == "01"
            assert err.mean() < 6.0
            if ts == "jpeg-ls-near":
                assert err.max() <= 2
        if isinstance(item, list):
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1"
            assert int(ds.NumberOfFrames) == 2 and float(ds.FrameTime) > 0
        else:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"
        region = ds.SequenceOfUltrasoundRegions[0]
        c0, r0, c1, r1 = frames[0].scan_bbox
        assert (region.RegionLocationMinX0, region.RegionLocationMaxX1) == (c0, c1 - 1)
        assert (region.RegionLocationMinY0, region.RegionLocationMaxY1) == (r0, r1 - 1)
        assert region.PhysicalDeltaX == pytest.approx(frames[0].spacing_mm / 10)
        assert ds.Manufacturer == vendor and ds.BurnedInAnnotation == "YES"


def test_photometric_choices(sample_frames: dict[str, list[SimFrame]], tmp_path: Path) -> None:
    grey = sample_frames[GREY_VENDOR][0]
    ds = _write(grey, tmp_path / "a.dcm", GREY_VENDOR, "explicit", "RGB")
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    ds = _write(
        sample_frames[TINT_VENDOR][0], tmp_path / "b.dcm", TINT_VENDOR, "rle", "MONOCHROME2"
    )
    assert ds.SamplesPerPixel == 1
    ds = _write(sample_frames[TINT_VENDOR][0], tmp_path / "c.dcm", TINT_VENDOR, "jpeg")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    with pytest.raises(ValueError, match="YBR_FULL_422"):
        _write(grey, tmp_path / "d.dcm", GREY_VENDOR, "explicit", "YBR_FULL_422")
    with pytest.raises(ValueError, match="transfer syntax"):
        _write(grey, tmp_path / "e.dcm", GREY_VENDOR, "jpeg-xl")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("ts", list(TRANSFER_SYNTAXES))
def test_dciodvfy_has_no_errors(
    ts: str, sample_frames: dict[str, list[SimFrame]], tmp_path: Path
) -> None:
    for vendor in (GREY_VENDOR, TINT_VENDOR):
        frames = sample_frames[vendor]
        for item, name in ((frames[0], f"{vendor[:3]}_s.dcm"), (frames, f"{vendor[:3]}_m.dcm")):
            path = tmp_path / name
            _write(item, path, vendor, ts)
            if ts == "deflated":
                # dciodvfy cannot read deflated files: check the same dataset inflated.
                ds = pydicom.dcmread(path)
                ds.file_meta.TransferSyntaxUID = TRANSFER_SYNTAXES["explicit"]
                ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
            res = subprocess.run(
                ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60
            )
            errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, (ts, vendor, name, errors)


def test_simulate_study_writes_labels(tmp_path: Path) -> None:
    study = simulate_study(
        tmp_path / "s",
        seed=9,
        vendor=HELD_OUT_VENDOR,
        n_images=3,
        n_loops=1,
        frames_per_loop=3,
        size=(96, 128),
        views=["lung", "thyroid_longitudinal"],
    )
    assert len(study.files) == 4 and all(p.exists() for p in study.files)
    with study.labels_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == [p.name for p in study.files]
    assert list(rows[0]) == [
        "file",
        "sop_instance_uid",
        "study_instance_uid",
        "vendor",
        "view",
        "nodule",
        "lung_pattern",
        "quality",
        "frames",
    ]
    series = set()
    for row, path in zip(rows, study.files, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == study.study_instance_uid == row["study_instance_uid"]
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert row["view"] in {"lung", "thyroid_longitudinal"}
        assert ds.Manufacturer == HELD_OUT_VENDOR
        series.add(ds.SeriesInstanceUID)
    assert rows[-1]["frames"] == "3" and len(series) == 2
    again = simulate_study(
        tmp_path / "t",
        seed=9,
        vendor=HELD_OUT_VENDOR,
        n_images=3,
        n_loops=1,
        frames_per_loop=3,
        size=(96, 128),
        views=["lung", "thyroid_longitudinal"],
    )
    assert again.study_instance_uid == study.study_instance_uid
    assert (tmp_path / "t" / "labels.csv").read_text() == study.labels_csv.read_text()


def test_cli_main_writes_studies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "--out",
            str(tmp_path / "out"),
            "--seed",
            "3",
            "--images",
            "2",
            "--loops",
            "1",
            "--frames",
            "2",
            "--studies",
            "2",
            "--transfer-syntax",
            "rle",
            "--size",
            "96x128",
        ]
    )
    assert rc == 0
    for k in (1, 2):
        folder = tmp_path / "out" / f"study_{k:03d}"
        assert (folder / "labels.csv").exists()
        assert len(list(folder.glob("*.dcm"))) == 3
        ds = pydicom.dcmread(next(folder.glob("CINE_*.dcm")))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert "labels" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--transfer-syntax", "nonsense"])


def test_acquisition_changes_alter_the_scanner_not_the_vendor() -> None:
    from simulator import ACQUISITION_CHANGES, acquisition_change
    from simulator.vendors import get_vendor

    base = get_vendor("Aurora Imaging")
    changed = {name: acquisition_change("Aurora Imaging", name) for name in ACQUISITION_CHANGES}
    assert changed["gain+3"].gain_db == base.gain_db + 3
    assert changed["gain+8"].gain_db == base.gain_db + 8
    assert changed["dynamic-range-15"].dynamic_range_db == base.dynamic_range_db - 15
    assert changed["coarse-probe"].psf_axial > base.psf_axial
    assert changed["coarse-probe"].line_density < base.line_density
    assert all(style.name == base.name for style in changed.values())
    with pytest.raises(ValueError, match="unknown acquisition change"):
        acquisition_change("Aurora Imaging", "gain+30")


def test_a_frameset_under_an_acquisition_change_is_the_same_studies_formed_otherwise() -> None:
    import torch

    from modelkit.data import simulate_frameset

    usual = simulate_frameset(2, seed=5, input_size=(64, 80), progress=False)
    brighter = simulate_frameset(2, seed=5, input_size=(64, 80), progress=False,
                                 acquisition="gain+8")
    assert usual.vendor == brighter.vendor
    assert torch.equal(usual.labels["view"], brighter.labels["view"])
    assert brighter.images.float().mean() > usual.images.float().mean()
    with pytest.raises(ValueError, match="unknown acquisition change"):
        simulate_frameset(1, seed=5, input_size=(64, 80), progress=False, acquisition="x")
