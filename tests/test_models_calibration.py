"""Calibration and operating points on hand-computed and toy data."""

from __future__ import annotations

import numpy as np
import pytest

from modelkit.calibration import (
    BinnedConfidence,
    aurc,
    cluster_bootstrap,
    confusion_matrix,
    ece_noise_floor,
    expected_calibration_error,
    fit_temperature,
    frame_nll,
    mean_nll,
    multiclass_auc,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
    youden_threshold,
)
from workers.models.packs import softmax

# Positives 0.9 0.8 0.7 0.4, negatives 0.6 0.3 0.2 0.1 0.05. Walking down the thresholds:
# 0.7 -> sens 3/4, spec 5/5 (J 0.75); 0.4 -> sens 4/4, spec 4/5 (J 0.80, the maximum).
SCORES = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1, 0.05])
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_youden_threshold_on_hand_computed_roc() -> None:
    op = youden_threshold(SCORES, LABELS)
    assert op.threshold == pytest.approx(0.4)
    assert op.sensitivity == pytest.approx(1.0)
    assert op.specificity == pytest.approx(0.8)
    assert op.youden_j == pytest.approx(0.8)


def test_target_sensitivity_threshold() -> None:
    op = threshold_for_sensitivity(SCORES, LABELS, 0.75)
    assert op.threshold == pytest.approx(0.7)
    assert (op.sensitivity, op.specificity) == pytest.approx((0.75, 1.0))
    with pytest.raises(ValueError, match="target sensitivity"):
        threshold_for_sensitivity(SCORES, LABELS, 0.0)


def test_roc_auc_hand_computed_and_ties() -> None:
    # 19 of the 20 positive/negative pairs are ordered correctly (0.4 < 0.6).
    assert roc_auc(SCORES, LABELS) == pytest.approx(19 / 20)
    assert roc_auc(np.ones(6), np.array([0, 1, 0, 1, 0, 1])) == pytest.approx(0.5)
    fpr, tpr, thresholds = roc_curve(SCORES, LABELS)
    assert fpr[0] == 0 and tpr[0] == 0 and np.isinf(thresholds[0])
    assert fpr[-1] == 1 and tpr[-1] == 1
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.ones(3), np.ones(3, dtype=int))


def test_multiclass_auc_perfect_and_confusion() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert multiclass_auc(p, y) == pytest.approx(1.0)
    assert confusion_matrix(p.argmax(1), y, 3).trace() == 6


def test_ece_of_a_perfectly_calibrated_bin_is_zero() -> None:
    # 10 predictions at confidence 0.8, 8 correct.
    p = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    # All at 0.8 but all correct: |1.0 - 0.8| = 0.2.
    assert expected_calibration_error(p, np.zeros(10, int)) == pytest.approx(0.2)


def test_temperature_scaling_lowers_ece_on_held_out_data() -> None:
    rng = np.random.default_rng(0)
    n, k = 6000, 4
    true_logits = rng.normal(size=(n, k)) * 1.5
    labels = np.array([rng.choice(k, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 3.0  # a miscalibrated model: right ranking, too sharp
    fit, held = slice(0, n // 2), slice(n // 2, n)
    temperature = fit_temperature(overconfident[fit], labels[fit])
    assert temperature == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(overconfident[held]), labels[held])
    after = expected_calibration_error(softmax(overconfident[held] / temperature), labels[held])
    assert before > 0.1
    assert after < before / 3
    assert after < 0.03


def test_fit_temperature_validates_inputs() -> None:
    with pytest.raises(ValueError, match=r"labels must be within \[0, 2\]"):
        fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(np.zeros(4), np.array([0, 1, 0, 1]))


def test_mean_nll_matches_the_logit_form() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = np.array([0, 2])
    expected = -(np.log(softmax(logits)[0, 0]) + np.log(softmax(logits)[1, 2])) / 2
    assert mean_nll(softmax(logits), y) == pytest.approx(expected)
    assert mean_nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-np.log(1e-12))


def test_per_frame_parts_give_the_same_ece_and_nll_on_every_subset() -> None:
    """The bootstrap's shortcut: ECE and NLL of a resample from parts computed once are
    exactly those recomputed from the resample's probabilities (duplicates included)."""
    rng = np.random.default_rng(5)
    p = softmax(rng.normal(0, 2, size=(300, 4)))
    y = rng.integers(0, 4, size=300)
    binned, nll = BinnedConfidence.of(p, y), frame_nll(p, y)
    assert binned.ece() == expected_calibration_error(p, y)
    for _ in range(20):
        i = rng.integers(0, 300, size=int(rng.integers(1, 300)))
        assert binned.ece(i) == expected_calibration_error(p[i], y[i])
        assert float(nll[i].mean()) == mean_nll(p[i], y[i])
    with pytest.raises(ValueError, match="no samples"):
        binned.ece(np.zeros(0, np.int64))


def test_cluster_bootstrap_widens_intervals_for_correlated_frames() -> None:
    """Ten identical frames per study carry the information of one study: resampling studies
    gives an interval about sqrt(10) times wider than resampling frames, and it covers the
    true rate."""
    rng = np.random.default_rng(3)
    studies = 60
    per_study = rng.random(studies) < 0.5
    correct = np.repeat(per_study, 10)
    groups = np.repeat(np.arange(studies), 10)
    stat = {"accuracy": lambda i: correct[i].mean()}
    by_study = cluster_bootstrap(groups, stat, resamples=2000, seed=1)["accuracy"]
    by_frame = cluster_bootstrap(np.arange(correct.size), stat, resamples=2000, seed=1)["accuracy"]
    width_study, width_frame = by_study.high - by_study.low, by_frame.high - by_frame.low
    assert 2.2 < width_study / width_frame < 4.5
    assert by_study.low < correct.mean() < by_study.high
    assert by_study.resamples == 2000
    # The half-width of a 95 % interval of a rate over 60 independent studies: 1.96 * SE.
    assert width_study / 2 == pytest.approx(1.96 * np.sqrt(0.25 / studies), rel=0.2)


def test_cluster_bootstrap_skips_undefined_resamples_and_validates() -> None:
    groups = np.arange(6)
    labels = np.array([1, 0, 0, 0, 0, 0])  # most resamples lose the only positive
    scores = np.linspace(1.0, 0.0, 6)
    got = cluster_bootstrap(
        groups,
        {"auc": lambda i: roc_auc(scores[i], labels[i]), "mean": lambda i: scores[i].mean()},
        resamples=200,
    )
    # The positive is missing from (5/6)^6 = 33 % of resamples: the AUC keeps the rest.
    assert "auc" in got and 100 < got["auc"].resamples < 200
    assert got["mean"].resamples == 200
    never = cluster_bootstrap(groups, {"x": lambda i: float("nan")}, resamples=50)
    assert never == {}
    with pytest.raises(ValueError, match="level"):
        cluster_bootstrap(groups, {}, level=1.5)
    with pytest.raises(ValueError, match="resamples"):
        cluster_bootstrap(groups, {}, resamples=3)


def test_ece_noise_floor_shrinks_with_frames_and_covers_a_calibrated_model() -> None:
    """A model calibrated by construction shows an ECE under the floor 95 % of the time;
    thirty frames give a floor of tenths, thousands of frames a few hundredths."""
    rng = np.random.default_rng(7)
    floors = {}
    for n in (30, 3000):
        p = rng.dirichlet([0.4] * 4, n)
        floors[n] = ece_noise_floor(p)
        below = 0
        cumulative = p.cumsum(axis=1)
        for _ in range(100):
            y = (rng.random((n, 1)) < cumulative).argmax(axis=1)  # labels drawn from p itself
            below += expected_calibration_error(p, y) <= floors[n]
        assert below >= 88, (n, below)
    assert floors[30] > 0.15 and floors[3000] < 0.05
    overconfident = np.eye(4)[rng.integers(0, 4, 3000)] * 0.9 + 0.025  # says 92.5 %
    y = rng.integers(0, 4, 3000)  # right 25 % of the time
    assert expected_calibration_error(overconfident, y) > 5 * ece_noise_floor(overconfident)


def test_aurc_rewards_a_confidence_that_ranks_errors_last() -> None:
    rng = np.random.default_rng(8)
    correct = rng.random(2000) > 0.2
    informed = correct + rng.normal(0, 0.1, 2000)  # errors mostly least confident
    blind = rng.random(2000)
    error = 1 - correct.mean()
    assert aurc(informed, correct) < 0.25 * error
    assert aurc(blind, correct) == pytest.approx(error, abs=0.03)
    assert aurc(correct.astype(float), correct) <= error**2  # a perfect ranking
    with pytest.raises(ValueError):
        aurc(np.array([]), np.array([]))
