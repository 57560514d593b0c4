"""Evaluation of a pack on labelled frames: metrics overall and per vendor, reports, plots.

:func:`evaluate_pack` returns a JSON-serialisable dict; :func:`markdown_report` and
:func:`model_card` render it; :func:`write_plots` draws reliability diagrams and ROC curves
with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modelkit.calibration import (
    BinnedConfidence,
    aurc,
    cluster_bootstrap,
    confusion_matrix,
    ece_noise_floor,
    expected_calibration_error,
    frame_nll,
    mean_nll,
    multiclass_auc,
    reliability_bins,
    roc_auc,
    roc_curve,
)
from modelkit.data import FrameSet
from workers.models.manifest import TaskKind
from workers.models.packs import ModelPack, softmax
from workers.models.preprocess import normalise

logger = logging.getLogger(__name__)


def pack_inputs(pack: ModelPack, frames: FrameSet) -> torch.Tensor:
    """The pack's network input for a frame set (resized when sizes differ)."""
    x = frames.unit_float()
    size = (pack.input.height, pack.input.width)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return normalise(x, pack.input)


def _round(value: float, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else float("nan")


#: Bootstrap resamples of the study-level confidence intervals (0: none).
BOOTSTRAP_RESAMPLES = 1000


def _task_metrics(
    pack: ModelPack,
    task: str,
    raw: Sequence[Mapping[str, np.ndarray]],
    calibrated: np.ndarray,
    labels: np.ndarray,
    studies: np.ndarray,
    *,
    resamples: int,
) -> dict[str, Any]:
    spec = pack.tasks[task]
    mask = labels >= 0
    n = int(mask.sum())
    if n == 0:
        return {"n": 0}
    y = labels[mask]
    p = calibrated[mask]
    p_raw = np.mean([softmax(r[spec.output][mask]) for r in raw], axis=0)
    correct = p.argmax(1) == y
    # Per-frame parts, computed once: each resample's ECE and NLL is then a few bincounts
    # and means over its frame indices (the same values as recomputing from p[i], y[i]).
    binned, binned_raw = BinnedConfidence.of(p, y), BinnedConfidence.of(p_raw, y)
    nll, nll_raw = frame_nll(p, y), frame_nll(p_raw, y)
    # Statistics with a study-bootstrap interval, as functions of frame indices: the point
    # value is the statistic of every frame, the interval that of resampled studies.
    statistics: dict[str, Callable[[np.ndarray], float]] = {
        "accuracy": lambda i: correct[i].mean(),
        # No interval of ECE itself: resampling inflates a binned ECE (duplicated studies
        # fill bins unevenly), so its percentile interval can exclude the estimate. The
        # paired change by calibration is what the interval is needed for, and its bias
        # largely cancels.
        "ece_change": lambda i: binned.ece(i) - binned_raw.ece(i),
        "nll_change": lambda i: float(nll[i].mean() - nll_raw[i].mean()),
    }
    out: dict[str, Any] = {
        "n": n,
        "studies": int(np.unique(studies[mask]).size),
        "accuracy": _round(float(correct.mean())),
        "auc_macro": _round(multiclass_auc(p, y)),
        "ece_uncalibrated": _round(expected_calibration_error(p_raw, y)),
        "ece": _round(expected_calibration_error(p, y)),
        # What a perfectly calibrated model would show on these frames by chance: an ECE
        # below it says nothing (a few dozen frames per vendor give 0.1-0.3).
        "ece_noise95": _round(ece_noise_floor(p)),
        "nll_uncalibrated": _round(mean_nll(p_raw, y)),
        "nll": _round(mean_nll(p, y)),
        # Selective prediction: how well the confidence orders errors last (lower better).
        "aurc": _round(aurc(p.max(1), correct)),
    }
    decided = _decisions(pack, task, p)
    out["confusion_matrix"] = confusion_matrix(decided, y, len(spec.label_names)).tolist()
    out["confusion_labels"] = list(spec.label_names)
    if spec.operating_point is not None:
        out["accuracy_at_operating_point"] = _round(float((decided == y).mean()))
    coverage = p.max(1) >= spec.threshold
    out["coverage_at_threshold"] = _round(float(coverage.mean()))
    out["accuracy_when_confident"] = (
        _round(float(correct[coverage].mean())) if coverage.any() else None
    )
    op = spec.operating_point
    if op is not None:
        k = spec.label_names.index(op.label)
        positive = (y == k).astype(np.int64)
        if 0 < positive.sum() < positive.size:
            score = p[:, k]
            called = score >= op.threshold
            binary: dict[str, Callable[[np.ndarray], float]] = {
                f"{op.label}_auc": lambda i: roc_auc(score[i], positive[i]),
                f"{op.label}_sensitivity": lambda i: _rate(called[i][positive[i] == 1]),
                f"{op.label}_specificity": lambda i: _rate(~called[i][positive[i] == 0]),
            }
            everything = np.arange(n)
            out.update({name: _round(statistic(everything)) for name, statistic in binary.items()})
            out[f"{op.label}_threshold"] = op.threshold
            statistics.update(binary)
    if resamples:
        intervals = cluster_bootstrap(studies[mask], statistics, resamples=resamples)
        out["ci95"] = {name: interval.as_list() for name, interval in intervals.items()}
    return out


def _decisions(pack: ModelPack, task: str, probabilities: np.ndarray) -> np.ndarray:
    """Label index the node reports per frame: the operating point's label when its
    probability reaches the threshold, else the most probable other label (argmax when the
    task has no operating point)."""
    spec = pack.tasks[task]
    op = spec.operating_point
    if op is None:
        return np.asarray(probabilities.argmax(1))
    k = spec.label_names.index(op.label)
    others = probabilities.copy()
    others[:, k] = -1.0
    return np.where(probabilities[:, k] >= op.threshold, k, others.argmax(1))


def _subset_metrics(
    pack: ModelPack,
    frames: FrameSet,
    raw: Sequence[Mapping[str, np.ndarray]],
    *,
    resamples: int,
) -> dict[str, Any]:
    prediction = pack.calibrate_outputs(raw)
    metrics: dict[str, Any] = {"frames": len(frames)}
    for name, spec in pack.tasks.items():
        if spec.kind is TaskKind.CLASSIFICATION:
            if name not in frames.labels:
                continue
            metrics[name] = _task_metrics(
                pack,
                name,
                raw,
                prediction.probabilities[name],
                frames.labels[name].numpy(),
                frames.study.numpy(),
                resamples=resamples,
            )
        elif name == "quality":
            q = frames.quality.numpy()
            mask = ~np.isnan(q)
            if mask.any():
                v = prediction.values[name][mask]
                varied = mask.sum() > 2 and float(v.std()) > 0 and float(q[mask].std()) > 0
                corr = float(np.corrcoef(v, q[mask])[0, 1]) if varied else float("nan")
                metrics[name] = {
                    "n": int(mask.sum()),
                    "mae": _round(float(np.abs(v - q[mask]).mean())),
                    "pearson_r": _round(corr),
                }
    ood_spec = pack.manifest.ood
    if prediction.ood_score is not None and ood_spec is not None:
        flagged = prediction.ood_score > ood_spec.threshold
        metrics["ood_score_median"] = _round(float(np.median(prediction.ood_score)), 2)
        if ood_spec.image is not None and pack.image_ood is not None:
            if frames.image_statistics is None:
                raise ValueError(f"{pack.name} has an image-statistics OOD score: the frames "
                                 "must carry their image statistics")
            image = pack.image_ood.score(frames.image_statistics.numpy(),
                                         pack.predicted_views(prediction.probabilities))
            by_image = image > ood_spec.image.threshold
            # Each part alone, and the node's rule: either part flags the frame.
            metrics["ood_score_flagged_fraction"] = _round(float(flagged.mean()))
            metrics["image_ood_flagged_fraction"] = _round(float(by_image.mean()))
            metrics["image_ood_score_median"] = _round(float(np.median(image)), 2)
            flagged = flagged | by_image
        metrics["ood_flagged_fraction"] = _round(float(flagged.mean()))
    return metrics


def _slice_raw(
    raw: Sequence[Mapping[str, np.ndarray]], index: np.ndarray
) -> list[dict[str, np.ndarray]]:
    return [{k: v[index] for k, v in member.items()} for member in raw]


def evaluate_pack(
    pack: ModelPack,
    frames: FrameSet,
    *,
    held_out_vendor: str | None = None,
    batch_size: int = 128,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """Metrics of ``pack`` on ``frames`` overall and per vendor.

    Per classification task: accuracy, macro one-vs-rest AUC, ECE (15 bins) of the raw and of
    the temperature-scaled probabilities, coverage and accuracy above the confidence floor;
    for a task with an operating point, AUC, sensitivity and specificity of its positive label;
    the mean NLL of raw and calibrated probabilities (what temperature scaling minimises); and
    95 % intervals (``ci95``) from ``resamples`` study-level bootstrap resamples, including the
    change of ECE and NLL by calibration. ``summary`` gathers headline figures for the manifest.
    """
    raw = pack.raw_outputs(pack_inputs(pack, frames), batch_size=batch_size)
    result: dict[str, Any] = {
        "overall": _subset_metrics(pack, frames, raw, resamples=resamples),
        "per_vendor": {},
    }
    vendors = np.array(frames.vendor)
    for vendor in frames.vendors():
        index = np.nonzero(vendors == vendor)[0]
        metrics = _subset_metrics(
            pack, frames.subset(index), _slice_raw(raw, index), resamples=resamples
        )
        metrics["held_out"] = vendor == held_out_vendor
        result["per_vendor"][vendor] = metrics
    if held_out_vendor is not None:
        index = np.nonzero(vendors != held_out_vendor)[0]
        if index.size:
            result["seen_vendors"] = _subset_metrics(
                pack, frames.subset(index), _slice_raw(raw, index), resamples=resamples
            )
    result["pack"] = {
        "name": pack.name,
        "version": pack.manifest.version,
        "sha256": pack.sha256 if pack.path is not None else None,
        "simulated_training_data": pack.manifest.simulated,
    }
    result["summary"] = summarise(result, held_out_vendor)
    result["_raw"] = raw  # for plots; dropped by to_json()
    return result


def summarise(result: Mapping[str, Any], held_out_vendor: str | None) -> dict[str, Any]:
    """Headline metrics for the manifest (accuracies, AUCs, ECEs; overall and per vendor)."""

    def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"frames": metrics.get("frames")}
        for task, m in metrics.items():
            if isinstance(m, Mapping) and "accuracy" in m:
                out[task] = {
                    k: m[k]
                    for k in (
                        "n",
                        "accuracy",
                        "auc_macro",
                        "ece_uncalibrated",
                        "ece",
                        "ece_noise95",
                        "aurc",
                        "malignant_auc",
                        "malignant_sensitivity",
                        "malignant_specificity",
                        "nll_uncalibrated",
                        "nll",
                        "ci95",
                    )
                    if k in m
                }
            elif isinstance(m, Mapping) and "mae" in m:
                out[task] = {"mae": m["mae"], "pearson_r": m["pearson_r"]}
        for key in ("ood_flagged_fraction", "ood_score_flagged_fraction",
                    "image_ood_flagged_fraction"):
            if key in metrics:
                out[key] = metrics[key]
        return out

    summary: dict[str, Any] = {"overall": headline(result["overall"])}
    if "seen_vendors" in result:
        summary["seen_vendors"] = headline(result["seen_vendors"])
    summary["per_vendor"] = {
        vendor: {**headline(m), "held_out": m.get("held_out", False)}
        for vendor, m in result["per_vendor"].items()
    }
    if held_out_vendor is not None:
        summary["held_out_vendor"] = held_out_vendor
    return summary


def to_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation without the raw arrays."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


_SIMULATED_WARNING = (
    "> **NOT FOR CLINICAL USE.** The pack was trained on **simulated** ultrasound images; "
    "these figures describe simulated images only."
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _with_ci(metrics: Mapping[str, Any], key: str) -> str:
    """``value (low-high)`` with the study-level 95 % interval when there is one."""
    value = metrics.get(key)
    interval = (metrics.get("ci95") or {}).get(key)
    if value is None or interval is None:
        return _fmt(value)
    return f"{_fmt(value)} ({interval[0]:.3f}-{interval[1]:.3f})"


def _within_noise(metrics: Mapping[str, Any], key: str) -> str:
    """An ECE, marked ``≈`` when a perfectly calibrated model could show it by chance."""
    value, noise = metrics.get(key), metrics.get("ece_noise95")
    if value is None or noise is None or value > noise:
        return _fmt(value)
    return f"\u2248{_fmt(value)}"


def _change(metrics: Mapping[str, Any], key: str) -> str:
    """Calibrated minus raw ``key`` (``ece``: ``ece - ece_uncalibrated``) with its interval."""
    after, before = metrics.get(key), metrics.get(f"{key}_uncalibrated")
    if after is None or before is None:
        return "–"
    interval = (metrics.get("ci95") or {}).get(f"{key}_change")
    text = f"{after - before:+.3f}"
    return f"{text} ({interval[0]:+.3f} to {interval[1]:+.3f})" if interval else text


_INTERVALS_NOTE = (
    "Brackets: 95 % intervals from resampling whole studies (frames of one study are not "
    "independent). ECE change and NLL: calibrated minus raw; an interval that contains 0 "
    "means the test set cannot tell whether temperature scaling helped."
)
_NOISE_NOTE = (
    "ECE noise: the 95th percentile of the ECE a perfectly calibrated model would show on "
    "the same frames by chance; an ECE marked \u2248 is within it, no evidence of "
    "miscalibration (few frames). AURC: area under the risk-coverage curve, the error rate "
    "averaged over every coverage when the least confident frames are withheld first "
    "(lower is better; about error\u00b2/2 for a confidence that ranks every error last, "
    "about the error rate for one that knows nothing)."
)


def markdown_report(result: Mapping[str, Any], *, header: bool = True) -> str:
    """A Markdown table per task: rows overall and per vendor (``header``: the title, the
    pack's identity and, for simulated training data, the not-for-clinical-use warning)."""
    rows: list[tuple[str, Mapping[str, Any]]] = [("overall", result["overall"])]
    if "seen_vendors" in result:
        rows.append(("training vendors", result["seen_vendors"]))
    for vendor, m in result["per_vendor"].items():
        rows.append((f"{vendor}{' (held out)' if m.get('held_out') else ''}", m))
    tasks = [t for t, m in result["overall"].items() if isinstance(m, Mapping) and "accuracy" in m]
    lines = ["# Evaluation", ""] if header else []
    about = (result.get("pack") or {}) if header else {}
    if about:
        lines += [f"Pack {about.get('name')} {about.get('version')}.", ""]
    if about.get("simulated_training_data"):
        lines += [_SIMULATED_WARNING, ""]
    if any("ci95" in (m or {}) for m in result["overall"].values() if isinstance(m, Mapping)):
        lines += [_INTERVALS_NOTE, ""]
    lines += [_NOISE_NOTE, ""]
    for task in tasks:
        extra = ["malignant_auc", "malignant_sensitivity", "malignant_specificity"]
        has_extra = any(extra[0] in (m.get(task) or {}) for _, m in rows)
        columns = [
            "subset",
            "frames (studies)",
            "accuracy",
            "AUC (macro)",
            "ECE raw",
            "ECE calibrated",
            "ECE noise",
            "ECE change",
            "NLL raw / calibrated",
            "coverage",
            "acc. confident",
            "AURC",
        ]
        if has_extra:
            columns += ["malignant AUC", "sensitivity", "specificity"]
        lines += [f"## {task}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for name, m in rows:
            t = m.get(task) or {}
            cells = [
                name,
                f"{t.get('n')} ({t['studies']})" if "studies" in t else t.get("n"),
                _with_ci(t, "accuracy"),
                t.get("auc_macro"),
                _within_noise(t, "ece_uncalibrated"),
                _within_noise(t, "ece"),
                t.get("ece_noise95"),
                _change(t, "ece"),
                f"{_fmt(t.get('nll_uncalibrated'))} / {_fmt(t.get('nll'))}",
                t.get("coverage_at_threshold"),
                t.get("accuracy_when_confident"),
                t.get("aurc"),
            ]
            if has_extra:
                cells += [_with_ci(t, k) for k in extra]
            lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
        lines.append("")
    for task in tasks:
        t = result["overall"][task]
        if not t.get("confusion_matrix"):
            continue
        names = t["confusion_labels"]
        rule = "at the operating point" if "accuracy_at_operating_point" in t else "most probable"
        lines += [
            f"### {task}: confusion matrix (overall; rows truth, columns decision {rule})",
            "",
            "| truth \\ decision | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 1),
        ]
        for name, counts in zip(names, t["confusion_matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")
        lines.append("")
    if "quality" in result["overall"]:
        lines += ["## quality", "", "| subset | MAE | Pearson r |", "|---|---|---|"]
        for name, m in rows:
            q = m.get("quality") or {}
            lines.append(f"| {name} | {_fmt(q.get('mae'))} | {_fmt(q.get('pearson_r'))} |")
        lines.append("")
    if "image_ood_flagged_fraction" in result["overall"]:
        lines += ["## out-of-distribution flag rate", "",
                  "Flagged: by the embedding score or the image statistics (the node's rule).",
                  "", "| subset | flagged | by the embedding score | by the image statistics |",
                  "|---|---|---|---|"]
        for name, m in rows:
            lines.append(f"| {name} | {_fmt(m.get('ood_flagged_fraction'))} | "
                         f"{_fmt(m.get('ood_score_flagged_fraction'))} | "
                         f"{_fmt(m.get('image_ood_flagged_fraction'))} |")
        lines.append("")
    elif "ood_flagged_fraction" in result["overall"]:
        lines += ["## out-of-distribution flag rate", "", "| subset | flagged |", "|---|---|"]
        for name, m in rows:
            lines.append(f"| {name} | {_fmt(m.get('ood_flagged_fraction'))} |")
        lines.append("")
    return "\n".join(lines)


def _operating_point_text(op: Mapping[str, Any], result: Mapping[str, Any]) -> str:
    """The operating point where it was chosen and, with intervals, on the test studies."""
    if not op:
        return "No operating point set."
    text = (
        f"Malignant nodule operating point ({op.get('method')}): p(malignant) >= "
        f"{op.get('threshold')} (sensitivity {op.get('sensitivity')}, specificity "
        f"{op.get('specificity')} on the calibration split where it was chosen"
    )
    test = result.get("overall", {}).get("nodule", {})
    if "malignant_sensitivity" not in test:
        return text + ")."
    return (
        text + f"; on the test studies sensitivity {_with_ci(test, 'malignant_sensitivity')}"
        f", specificity {_with_ci(test, 'malignant_specificity')}). A threshold chosen to "
        "maximise Youden's index on one sample is optimistic on that sample; the test "
        "figures are the ones to expect."
    )


def model_card(manifest: Mapping[str, Any], result: Mapping[str, Any],
               rules: Sequence[str] = ()) -> str:
    """``MODEL_CARD.md`` of a pack: identity, intended use, data, calibration, metrics, and
    ``rules``, the pack's abstention rule (:func:`workers.models.manifest.abstention_rules`)."""
    simulated = bool(manifest["training_data"].get("simulated"))
    warning = (
        "> **NOT FOR CLINICAL USE.** This pack was trained and evaluated on **simulated** "
        "ultrasound images only (sononode's own simulator with fictional vendors). Its outputs "
        "say nothing about real patients. It exists to exercise the node end to end.\n"
        if simulated
        else ""
    )
    tasks = manifest["tasks"]
    calib_rows = []
    for name, task in tasks.items():
        c = task.get("calibration") or {}
        if c:
            calib_rows.append(
                f"| {name} | {_fmt(c.get('frames'))} | {c.get('temperature')} | "
                f"{_fmt(c.get('ece_before'))} | {_fmt(c.get('ece_after'))} | "
                f"{_fmt(c.get('nll_before'))} | {_fmt(c.get('nll_after'))} | "
                f"{task.get('threshold')} |"
            )
    op = tasks.get("nodule", {}).get("operating_point") or {}
    ood = manifest.get("ood") or {}
    training = manifest["training_data"]
    size = manifest.get("metrics", {}).get("size", {})
    metrics = manifest.get("metrics", {})
    held_out = metrics.get("held_out_vendor")
    shift: list[str] = []
    if held_out and held_out in metrics.get("per_vendor", {}) and "seen_vendors" in metrics:
        seen, unseen = metrics["seen_vendors"], metrics["per_vendor"][held_out]
        for task, key in (
            ("view", "accuracy"),
            ("nodule", "accuracy"),
            ("nodule", "malignant_auc"),
            ("lung_pattern", "accuracy"),
        ):
            a, b = seen.get(task, {}).get(key), unseen.get(task, {}).get(key)
            if a is not None and b is not None:
                shift.append(f"| {task} {key} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
        a, b = seen.get("ood_flagged_fraction"), unseen.get("ood_flagged_fraction")
        if a is not None and b is not None:
            shift.append(f"| out-of-distribution flag rate | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    shift_section = (
        [
            "## Vendor shift",
            "",
            f"Vendor style {held_out} was held out of training and calibration. On the fresh "
            "test studies:",
            "",
            f"| metric | training vendors | {held_out} (unseen) | difference |",
            "|---|---|---|---|",
            *shift,
            "",
        ]
        if shift
        else []
    )
    recipe = []
    if "training_seconds" in training:
        recipe.append(
            f"Training took {training['training_seconds']} s ({training.get('epochs')} epochs, "
            f"{training.get('torch_threads', '?')} CPU threads), simulation "
            f"{training.get('simulation_seconds')} s."
        )
    if "preprocessing" in training:
        recipe.append(
            f"Pre-processing of every training and test frame: {training['preprocessing']}, "
            "i.e. exactly the node's at inference (QC's scan region, masked outside the sector)."
        )
    return "\n".join(
        [
            f"# Model card: {manifest['name']} {manifest['version']}",
            "",
            warning,
            "## What it does",
            "",
            "One B-mode frame (grey crop of the scan region, resized to "
            f"{manifest['input']['height']}x{manifest['input']['width']}) in; out: the view "
            "(abdomen, thyroid transverse, thyroid longitudinal, cardiac apical 4-chamber, lung), "
            "for thyroid views a nodule class (none / benign / malignant), for the lung view a "
            "pattern (normal / B-lines / consolidation), an image quality score in [0, 1], and an "
            "embedding whose Mahalanobis distance to the training data flags out-of-distribution "
            "input. Cine loops are averaged over sampled frames by the node.",
            "",
            f"Architecture: `{manifest['architecture']['name']}` "
            f"{manifest['architecture'].get('params', {})}, {size.get('parameters', '?')} "
            f"parameters ({size.get('float32_megabytes', '?')} MB float32).",
            "",
            "## Intended use",
            "",
            (
                "Exercising and testing the node end to end (DICOM in, SR out) and "
                "demonstrating the model toolkit. It is not a medical device and must not "
                "inform any clinical decision."
                if simulated
                else "See the training data and metrics below; validate on local data first."
            ),
            "",
            "## Training data",
            "",
            training["description"],
            "",
            *([" ".join(recipe), ""] if recipe else []),
            "## Calibration and operating points",
            "",
            "Temperature scaling fitted by NLL (LBFGS) on held-out studies; ECE (15 bins) and "
            "mean NLL on that calibration split. Whether it also helps on new studies is in "
            "the test tables below (ECE change and NLL, with intervals).",
            "",
            "| task | frames | temperature | ECE before | ECE after | NLL before | NLL after "
            "| confidence floor |",
            "|---|---|---|---|---|---|---|---|",
            *calib_rows,
            "",
            _operating_point_text(op, result),
            "",
            (
                f"Out of distribution: Mahalanobis distance > {ood.get('threshold')} "
                f"(keeps {ood.get('tpr')} of held-out in-distribution frames)."
                if ood
                else ""
            ),
            (
                f"Or: image statistics (grey levels and texture of the crop as received) at a "
                f"Mahalanobis distance > {ood['image'].get('threshold')} from those of the "
                f"training images of the predicted view (keeps {ood['image'].get('tpr')} of "
                f"{ood['image'].get('frames')} held-out in-distribution frames)."
                if ood.get("image")
                else ""
            ),
            "",
            *(["## When the node abstains", "", *[f"{i}. {rule}" for i, rule in
                                                   enumerate(rules, 1)], ""] if rules else []),
            "## Metrics on fresh simulated test studies",
            "",
            manifest.get("metrics", {}).get("test_set", ""),
            "",
            markdown_report(result, header=False).replace("## ", "### "),
            "",
            *shift_section,
            "## Limitations",
            "",
            "- Simulated images only; real scanners, patients and pathologies differ."
            if simulated
            else "- See the training data description.",
            "- One vendor is held out from training to measure vendor shift; expect lower "
            "accuracy and more abstentions on unseen vendors.",
            "- Every figure is an estimate from a finite test set: the intervals (95 %, whole "
            "studies resampled) say how far a fresh evaluation may land "
            "(tests/test_models_reference.py checks fresh studies against them).",
            "- The node abstains (and asks for human review) below each task's confidence floor "
            "and for out-of-distribution input.",
            "",
            f"License: {manifest.get('license')}. Citation: {manifest.get('citation')}",
            "",
        ]
    )


def write_plots(
    pack: ModelPack, frames: FrameSet, result: Mapping[str, Any], folder: Path
) -> list[Path]:
    """Reliability diagrams (per classification task) and the malignant ROC, overall and per
    vendor, as PNG files in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    raw = result["_raw"]
    vendors = np.array(frames.vendor)
    subsets = [("overall", np.arange(len(frames)))] + [
        (v, np.nonzero(vendors == v)[0]) for v in frames.vendors()
    ]
    written: list[Path] = []
    for name, spec in pack.tasks.items():
        if spec.kind is not TaskKind.CLASSIFICATION or name not in frames.labels:
            continue
        fig, axes = plt.subplots(1, len(subsets), figsize=(3.2 * len(subsets), 3.4), squeeze=False)
        for ax, (subset, index) in zip(axes[0], subsets, strict=True):
            sub_raw = _slice_raw(raw, index)
            y = frames.labels[name].numpy()[index]
            mask = y >= 0
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set_title(subset, fontsize=9)
            if mask.sum() == 0:
                continue
            p_cal = pack.calibrate_outputs(sub_raw).probabilities[name][mask]
            p_raw = np.mean([softmax(r[spec.output][mask]) for r in sub_raw], axis=0)
            for probs, label, colour in (
                (p_raw, "raw", "tab:orange"),
                (p_cal, "calibrated", "tab:blue"),
            ):
                bins = reliability_bins(probs, y[mask])
                ok = bins.count > 0
                ax.plot(
                    bins.confidence[ok],
                    bins.accuracy[ok],
                    marker="o",
                    ms=3,
                    color=colour,
                    label=f"{label} ECE {expected_calibration_error(probs, y[mask]):.3f}",
                )
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=7)
        fig.suptitle(f"Reliability: {name}")
        fig.tight_layout()
        path = folder / f"reliability_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        op = spec.operating_point
        if op is None:
            continue
        k = spec.label_names.index(op.label)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for subset, index in subsets:
            y = frames.labels[name].numpy()[index]
            mask = y >= 0
            positive = (y[mask] == k).astype(np.int64)
            if not 0 < positive.sum() < positive.size:
                continue
            score = pack.calibrate_outputs(_slice_raw(raw, index)).probabilities[name][mask, k]
            fpr, tpr, _ = roc_curve(score, positive)
            ax.plot(fpr, tpr, lw=1.2, label=f"{subset} AUC {roc_auc(score, positive):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"ROC: {name} = {op.label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"roc_{name}_{op.label}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
