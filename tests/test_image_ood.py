"""The image-statistics part of a pack's OOD detector: the statistics, the scorer, the pack
format, the Analyser's rule and the command that fits it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicom_sr.model import QCOutcome
from modelkit.data import FrameSet
from modelkit.image_ood import fit_image_ood, write_image_ood
from modelkit.pack_writer import IMAGE_OOD_FILE, write_pack
from modelkit.testing import StubNet, tiny_manifest
from modelkit.train import CalibrationResult, apply_calibration
from workers.imaging.types import PreparedInstance
from workers.models.image_statistics import (
    POOLED,
    STATISTICS,
    ImageStatisticsScorer,
    image_statistics,
)
from workers.models.inference import Analyser
from workers.models.manifest import PackIntegrityError, abstention_rules, read_manifest
from workers.models.ood import MahalanobisScorer
from workers.models.packs import ModelPack


def _speckle(rng: np.random.Generator, *, smooth: float = 0.0, gain: float = 1.0,
             shape: tuple[int, int] = (200, 260)) -> np.ndarray:
    """A grey crop of Rayleigh speckle in a sector-like mask (zero outside), in [0, 1]."""
    x = rng.rayleigh(0.25, size=shape)
    if smooth:
        x = ndimage.gaussian_filter(x, smooth)
    x = np.clip(x * gain, 0.03, 1.0)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    mask = np.abs(cols - shape[1] / 2) < 20 + rows * 0.5
    return np.where(mask, x, 0.0).astype(np.float32)


def test_statistics_see_grey_levels_and_texture_not_the_sector_outline() -> None:
    rng = np.random.default_rng(1)
    base = image_statistics(_speckle(rng))
    assert base.shape == (len(STATISTICS),)
    names = list(STATISTICS)
    smooth = image_statistics(_speckle(rng, smooth=1.5))
    for name in ("laplacian_1", "gradient_x_1", "gradient_y_1"):
        # Speckle reduction lowers the fine texture, relative to the grey-level spread.
        assert smooth[names.index(name)] < base[names.index(name)] - 0.3
    bright = image_statistics(_speckle(rng, gain=1.6))
    assert bright[names.index("grey_q50")] > base[names.index("grey_q50")] + 0.1
    # The same texture in a narrower sector: the texture statistics barely move.
    narrow = _speckle(rng)
    narrow[:, :60] = 0.0
    narrow[:, -60:] = 0.0
    texture = slice(names.index("laplacian_1"), None)
    assert np.abs(image_statistics(narrow)[texture] - base[texture]).max() < 0.1
    with pytest.raises(ValueError, match="2-D grey crop"):
        image_statistics(np.zeros((3, 3)))


def _scorer(rng: np.random.Generator) -> ImageStatisticsScorer:
    return ImageStatisticsScorer.fit(np.stack([image_statistics(_speckle(rng))
                                               for _ in range(40)]))


def test_scorer_ranks_unfamiliar_crops_farther_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    scorer = _scorer(rng)
    familiar = scorer.score_crops([_speckle(rng) for _ in range(10)])
    smoothed = scorer.score_crops([_speckle(rng, smooth=1.5) for _ in range(10)])
    assert smoothed.min() > familiar.max()
    scorer.save(tmp_path / "s.npz")
    again = ImageStatisticsScorer.load(tmp_path / "s.npz")
    np.testing.assert_allclose(again.score_crops([_speckle(np.random.default_rng(3))]),
                               scorer.score_crops([_speckle(np.random.default_rng(3))]))
    np.savez(tmp_path / "other.npz", means=scorer.means, precisions=scorer.precisions,
             classes=np.asarray(scorer.classes), statistics=np.asarray(["a"] * len(STATISTICS)))
    with pytest.raises(ValueError, match="are not this node's"):
        ImageStatisticsScorer.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="fitting needs"):
        ImageStatisticsScorer.fit(np.zeros((5, len(STATISTICS))))


def test_each_view_is_compared_with_its_own_training_frames() -> None:
    """Fine speckle is familiar for one view and unfamiliar for another: the distance is to
    the Gaussian of the view the frame is given (pooled for a view with too few frames)."""
    rng = np.random.default_rng(7)
    fine = [image_statistics(_speckle(rng)) for _ in range(30)]
    smooth = [image_statistics(_speckle(rng, smooth=1.5)) for _ in range(30)]
    scorer = ImageStatisticsScorer.fit(np.stack(fine + smooth),
                                       ["thyroid"] * 30 + ["lung"] * 30 + [])
    assert scorer.classes == (POOLED, "lung", "thyroid")
    crop = image_statistics(_speckle(rng))[None]
    as_thyroid = scorer.score(crop, ["thyroid"])[0]
    assert scorer.score(crop, ["lung"])[0] > 3 * as_thyroid
    assert scorer.score(crop, ["abdomen"])[0] == scorer.score(crop)[0]  # pooled
    few = ImageStatisticsScorer.fit(np.stack(fine + smooth), ["thyroid"] * 50 + ["lung"] * 10)
    assert few.classes == (POOLED, "thyroid")


def _frames(rng: np.random.Generator, n: int, *, smooth: float = 0.0) -> FrameSet:
    stats = np.stack([image_statistics(_speckle(rng, smooth=smooth)) for _ in range(n)])
    return FrameSet(images=torch.zeros(n, 8, 8, dtype=torch.uint8),
                    labels={"view": torch.zeros(n, dtype=torch.int64)},
                    quality=torch.zeros(n), vendor=["A"] * n,
                    study=torch.arange(n), image_statistics=torch.from_numpy(stats).float())


def _image_ood_pack(tmp_path: Path) -> tuple[ModelPack, Path]:
    """A stub pack whose embedding score never flags, with image statistics of speckle."""
    rng = np.random.default_rng(4)
    fit = fit_image_ood(_frames(rng, 60), _frames(rng, 40), tpr=0.95)
    assert fit.threshold_frames == 40 and fit.fit_frames == 60
    manifest = tiny_manifest()
    manifest["ood"]["image"] = fit.manifest_block()
    nets = [StubNet({"view": np.array([0.0, 6.0, 0.0, 0.0, 0.0]),
                     "nodule": np.array([4.0, 0.0, 0.0]),
                     "lung_pattern": np.array([4.0, 0.0, 0.0])})]
    folder = write_pack(tmp_path / "pack", manifest, [nets[0].state_dict()],
                        ood=_embedding_scorer(), image_ood=fit.scorer)
    pack = ModelPack(read_manifest(folder), nets, path=folder, ood=_embedding_scorer(),
                     image_ood=ImageStatisticsScorer.load(folder / IMAGE_OOD_FILE),
                     device="cpu")
    return pack, folder


def _embedding_scorer() -> MahalanobisScorer:
    return MahalanobisScorer(np.zeros(8), np.eye(8))


def test_the_pack_carries_verifies_and_keeps_its_image_statistics(tmp_path: Path) -> None:
    pack, folder = _image_ood_pack(tmp_path)
    block = json.loads((folder / "manifest.json").read_text())["ood"]["image"]
    assert block["stats"] == IMAGE_OOD_FILE and len(block["sha256"]) == 64
    assert block["frames"] == 40 and block["tpr"] == 0.95
    assert any("Image statistics" in rule and "40 held-out" in rule
               for rule in abstention_rules(pack.manifest))
    # A recalibration keeps the block; a rewrite without the scorer drops it.
    kept = apply_calibration(json.loads(json.dumps(pack.manifest.raw)), _calibration(pack))
    assert kept["ood"]["image"] == block
    plain = write_pack(tmp_path / "plain", dict(pack.manifest.raw),
                       [pack.networks[0].state_dict()], ood=_embedding_scorer())
    assert "image" not in json.loads((plain / "manifest.json").read_text())["ood"]
    with pytest.raises(ValueError, match=r"goes with the manifest's ood\.image"):
        ModelPack(pack.manifest, pack.networks, ood=_embedding_scorer(), device="cpu")
    (folder / IMAGE_OOD_FILE).write_bytes(b"tampered")
    with pytest.raises(PackIntegrityError, match=IMAGE_OOD_FILE):
        ModelPack.load(folder, device="cpu")


def _calibration(pack: ModelPack) -> CalibrationResult:
    return CalibrationResult({}, {}, {}, None, _embedding_scorer(), 3.0, 0.95)


def _item(crop: np.ndarray, uid: str) -> PreparedInstance:
    """A one-frame RGB instance showing ``crop``, QC passed with the whole frame as region."""
    from workers.imaging.types import DecodedInstance, InstanceQC

    h, w = crop.shape
    grey = (crop * 255).round().astype(np.uint8)
    instance = DecodedInstance.from_pixels(np.repeat(grey[None, :, :, None], 3, axis=3),
                                           sop_instance_uid=uid, manufacturer="Test")
    return PreparedInstance(instance, InstanceQC(outcome=QCOutcome.PASS, checks=(),
                                                 usable_frames=(0,), scan_region=(0, 0, w, h)))


def test_the_analyser_flags_an_image_unlike_the_training_images(tmp_path: Path) -> None:
    pack, _ = _image_ood_pack(tmp_path)
    rng = np.random.default_rng(9)
    familiar = _item(_speckle(rng), "1.2.826.0.1.3680043.8.498.21")
    smoothed = _item(_speckle(rng, smooth=2.0), "1.2.826.0.1.3680043.8.498.22")
    analysis = Analyser([pack]).analyse_study_monitored("1.2.3", [familiar, smoothed])
    ok, strange = analysis.result.images
    assert not ok.out_of_distribution and ok.view is not None and not ok.view.abstained
    assert strange.out_of_distribution and strange.needs_review
    assert strange.view is not None and strange.view.abstained
    assert "grey levels and texture unlike the images" in (strange.view.reason or "")
    # The drift monitor counts the flag too.
    (outputs,) = analysis.outputs
    assert outputs[0] is not None and not outputs[0].out_of_distribution
    assert outputs[1] is not None and outputs[1].out_of_distribution


def test_fit_needs_statistics_and_enough_held_out_frames() -> None:
    rng = np.random.default_rng(5)
    frames = _frames(rng, 40)
    with pytest.raises(ValueError, match="at least 20 held-out frames"):
        fit_image_ood(frames, _frames(rng, 10))
    bare = FrameSet(images=frames.images, labels=frames.labels, quality=frames.quality,
                    vendor=frames.vendor, study=frames.study)
    with pytest.raises(ValueError, match="carry no image statistics"):
        fit_image_ood(bare, frames)
    with pytest.raises(ValueError, match="tpr"):
        fit_image_ood(frames, frames, tpr=1.0)
    # The threshold is never set on a frame the Gaussians were fitted on.
    with pytest.raises(ValueError, match="include frames the statistics were fitted on"):
        fit_image_ood(frames, frames)
    with pytest.raises(ValueError, match="include frames the statistics were fitted on"):
        fit_image_ood(frames, frames.subset(np.arange(25)))


def test_write_image_ood_refuses_a_pack_without_a_detector(tmp_path: Path) -> None:
    _, folder = _image_ood_pack(tmp_path)
    rng = np.random.default_rng(6)
    fit = fit_image_ood(_frames(rng, 40), _frames(rng, 30), tpr=0.9)
    write_image_ood(folder, fit, version="0.0.2")
    written = read_manifest(folder)
    assert written.version == "0.0.2" and written.ood is not None
    assert written.ood.image is not None and written.ood.image.tpr == 0.9
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["ood"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no OOD detector"):
        write_image_ood(folder, fit)


def test_the_command_fits_on_simulated_studies_and_rewrites_the_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelkit.cli import main
    from modelkit.testing import write_tiny_pack

    folder = write_tiny_pack(tmp_path / "pack")
    args = ["image-ood", str(folder), "--simulated", "20", "--seed", "3", "--tpr", "0.9",
            "--version", "0.0.9", "--processes", "1"]
    with pytest.raises(SystemExit, match="needs --evaluate-seed"):
        main([*args, "--evaluate-studies", "5"])
    assert main([*args, "--evaluate-studies", "6", "--evaluate-seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "keeps 90.0% of" in out
    pack = ModelPack.load(folder, device="cpu")
    assert pack.manifest.version == "0.0.9" and pack.image_ood is not None
    assert pack.manifest.ood is not None and pack.manifest.ood.image is not None
    metrics = pack.manifest.raw["metrics"]
    assert "image_ood_flagged_fraction" in metrics["overall"]
    assert "6 fresh simulated studies (seed 4)" in metrics["test_set"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## When the node abstains" in card and "Image statistics" in card
    assert "by the image statistics" in (folder / "EVALUATION.md").read_text()
