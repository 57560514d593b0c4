"""``sononode model <command>``: train, pretrain, calibrate, threshold, evaluate, distill, info.

Each command reads its data from a DICOM folder plus labels CSV (``--data``, ``--labels``)
or simulates it (``--simulated N`` studies, ``--seed``), and writes a model pack or a
report. Multi-task packs (``multitask_mobilenet``) only, except ``info``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkit.data import read_labelled_folder, simulate_frameset, split_by_study, vendor_names
from modelkit.drift import REFERENCE_SEED as DRIFT_REFERENCE_SEED
from modelkit.drift import fit_pack_reference, write_reference
from modelkit.evaluate import evaluate_pack, markdown_report, model_card, to_json, write_plots
from modelkit.image_ood import fit_image_ood, write_image_ood
from modelkit.info import cmd_info
from modelkit.loops import LoopSet, read_loop_folder, simulate_loopset
from modelkit.pack_writer import write_pack
from modelkit.pretrain import (
    PRETRAIN_BATCH_LOOPS,
    PRETRAIN_LR,
    PRETRAIN_STEPS,
    PretrainedBackbone,
    chance_loss,
    load_pretrained,
    loop_data_record,
    pretrain_backbone,
    write_pretrained,
)
from modelkit.train import (
    INPUT_SIZE,
    REFERENCE_CALIBRATION_STUDIES,
    REFERENCE_EPOCHS,
    REFERENCE_OUTPUT_STRIDE,
    REFERENCE_SEED,
    REFERENCE_TEST_STUDIES,
    REFERENCE_TRAIN_STUDIES,
    REFERENCE_WIDTH,
    CalibrationResult,
    apply_calibration,
    build_reference_pack,
    calibrate_members,
    default_input_spec,
    multitask_manifest,
    network_outputs,
    pack_from_networks,
    size_report,
    train_network,
)
from node.drift.reference import DEFAULT_FALSE_ALARMS
from simulator.vendors import ACQUISITION_CHANGES
from workers.models.manifest import PackError, abstention_rules
from workers.models.nets import POOLING, MultiTaskMobileNet
from workers.models.packs import ModelPack

logger = logging.getLogger(__name__)


def _add_data_args(
    parser: argparse.ArgumentParser, *, simulated_default: int | None = None
) -> None:
    group = parser.add_argument_group("data (a DICOM folder with labels, or simulated studies)")
    group.add_argument("--data", type=Path, help="folder of DICOM files")
    group.add_argument(
        "--labels",
        type=Path,
        help="CSV: file or sop_instance_uid, then view, nodule, lung_pattern, quality columns "
        "(default: every labels.csv under --data, as 'sononode simulate' writes them)",
    )
    group.add_argument(
        "--simulated",
        type=int,
        default=simulated_default,
        metavar="N",
        help="simulate N studies instead of reading files",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (simulation, splits, init)")
    group.add_argument(
        "--include-held-out",
        action="store_true",
        help="simulate the held-out vendor too (always on for evaluate)",
    )


def _frames(args: argparse.Namespace, input_size: tuple[int, int], *, all_vendors: bool = False):  # type: ignore[no-untyped-def]

    if args.data is not None:
        labels = [args.labels] if args.labels is not None else sorted(args.data.rglob("labels.csv"))
        if not labels:
            raise SystemExit(f"--data {args.data} has no labels.csv: give --labels CSV")
        return read_labelled_folder(args.data, labels, input_size=input_size)
    if not args.simulated:
        raise SystemExit("give --data DIR --labels CSV, or --simulated N")
    vendors = None
    if all_vendors or args.include_held_out:
        from simulator import VENDOR_STYLES

        vendors = vendor_names(VENDOR_STYLES)
    return simulate_frameset(args.simulated, seed=args.seed, input_size=input_size, vendors=vendors,
                             acquisition=getattr(args, "acquisition", None))


def _input_size(pack: Any) -> tuple[int, int]:
    return (pack.input.height, pack.input.width)


def _held_out() -> str | None:
    try:
        from simulator import HELD_OUT_VENDOR
    except ImportError:
        return None
    return str(HELD_OUT_VENDOR)


def _write_json(path: Path | None, data: Any) -> None:
    text = json.dumps(data, indent=2, default=float)
    if path is None:
        print(text)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


def _three_way_split(frames: Any, seed: int) -> list[Any]:
    """Train / calibration / test parts (70/15/15 of the studies); refuses too few studies."""
    parts = split_by_study(frames, [0.7, 0.15, 0.15], seed=seed)
    if any(len(p) == 0 for p in parts):
        studies = len(set(frames.study.tolist()))
        raise SystemExit(
            f"{studies} studies cannot be split 70/15/15 by study into non-empty train, "
            "calibration and test parts: give at least 7 studies"
        )
    return parts


# ----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    spec = default_input_spec()
    width, pool, stride = args.width, args.pool, args.output_stride
    net = MultiTaskMobileNet(width=width, pool=pool, output_stride=stride)
    pretrained = None
    if args.from_pretrained is not None:
        if args.init_from is not None:
            raise SystemExit("give --init-from PACK or --from-pretrained BACKBONE, not both")
        pretrained = load_pretrained(args.from_pretrained)
        spec = pretrained.input
        width, stride = pretrained.width, pretrained.output_stride
        net = pretrained.network(pool=pool)
    if args.init_from is not None:
        source = ModelPack.load(args.init_from, device="cpu")
        if source.manifest.architecture != "multitask_mobilenet":
            raise SystemExit(
                f"--init-from needs a multitask_mobilenet pack, got {source.manifest.architecture}"
            )
        spec = source.input
        width = float(source.manifest.architecture_params.get("width", 1.0))
        pool = str(source.manifest.architecture_params.get("pool", "avg"))
        stride = int(source.manifest.architecture_params.get("output_stride", 32))
        net = MultiTaskMobileNet(width=width, pool=pool, output_stride=stride)
        net.load_state_dict(source.networks[0].state_dict())
    torch.manual_seed(args.seed)
    data = _frames(args, (spec.height, spec.width) if args.init_from or pretrained else INPUT_SIZE)
    train_set, cal_set, test_set = _three_way_split(data, args.seed)
    report = train_network(
        net,
        train_set,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        spec=spec,
        freeze_backbone=args.freeze_backbone,
    )
    embeddings = network_outputs(net, train_set, spec=spec)["embedding"]
    cal = calibrate_members([net], cal_set, spec=spec, train_embeddings=embeddings)
    image_ood = fit_image_ood(train_set, cal_set) if len(cal_set) >= 20 else None
    simulated = args.data is None or args.simulated_data
    manifest = multitask_manifest(
        name=args.name,
        version=args.version,
        width=width,
        pool=pool,
        output_stride=stride,
        simulated=simulated,
        training_description=(
            f"{len(train_set)} frames "
            f"({'simulated, seed ' + str(args.seed) if args.data is None else args.data}"
            f"{', simulated images' if args.data is not None and simulated else ''}); "
            f"split by study 70/15/15 train/calibration/test"
            + (f"; initialised from {args.init_from}" if args.init_from else "")
            + (_pretrained_text(pretrained) if pretrained is not None else "")
            + ("; backbone frozen" if args.freeze_backbone else "")
        ),
        input_size=(spec.height, spec.width),
    )
    manifest = apply_calibration(manifest, cal)
    if image_ood is not None:
        manifest["ood"]["image"] = image_ood.manifest_block()
    if pretrained is not None:
        manifest["training_data"]["pretrained_backbone"] = pretrained.summary()
    pack = pack_from_networks(manifest, [net], ood=cal.ood,
                              image_ood=None if image_ood is None else image_ood.scorer)
    evaluation = evaluate_pack(pack, test_set, held_out_vendor=_held_out())
    manifest["metrics"] = {
        "test_set": f"{len(test_set)} frames of held-out studies",
        **evaluation["summary"],
        "size": size_report([net]),
    }
    write_pack(
        args.out,
        manifest,
        [net.state_dict()],
        ood=cal.ood,
        image_ood=None if image_ood is None else image_ood.scorer,
        extra_files={
            "MODEL_CARD.md": model_card(manifest, evaluation, abstention_rules(pack.manifest)),
            "EVALUATION.md": markdown_report(evaluation),
        },
    )
    print(
        f"trained {report.frames_seen} frames in {report.seconds:.0f} s, losses "
        f"{[round(x, 3) for x in report.epoch_loss]}; ECE before {cal.ece_before} after "
        f"{cal.ece_after}; NLL before {cal.nll_before} after {cal.nll_after}; "
        f"pack written to {args.out}"
    )
    _write_json(None, to_json(evaluation)["summary"]["overall"])
    return 0


def _pretrained_text(backbone: PretrainedBackbone) -> str:
    data = backbone.info.get("data") or {}
    return (
        f"; backbone pretrained contrastively on {data.get('loops', '?')} unlabelled loops "
        f"({data.get('source', 'unknown source')}; sha256 {backbone.sha256[:12]}), "
        "then fine-tuned"
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    spec = default_input_spec()
    size = (spec.height, spec.width)
    if (args.data is None) == (args.simulated is None):
        raise SystemExit("give --data DIR (a folder of cine loops) or --simulated N loops")
    if args.data is not None:
        if args.vendor or args.acquisition:
            raise SystemExit("--vendor and --acquisition shape simulated loops: use them "
                             "with --simulated")
        loops = read_loop_folder(args.data, input_size=size, max_frames=args.frames_per_loop)
        source, simulated = str(args.data), bool(args.simulated_data)
    else:
        loops = simulate_loopset(
            args.simulated, seed=args.seed, input_size=size, vendors=args.vendor,
            frames_per_loop=args.frames_per_loop, acquisition=args.acquisition,
            processes=args.processes,
        )
        source = f"simulated loops, seed {args.seed}" + (
            f", acquisition {args.acquisition}" if args.acquisition else "")
        simulated = True
    held: LoopSet | None = None
    train_loops = loops
    if loops.loops >= 10:  # a tenth of the loops (at least 2: a pair check needs two)
        train_loops, held = loops.split(max(0.1, 2.0 / loops.loops), seed=args.seed)
    net = MultiTaskMobileNet(width=args.width, output_stride=args.output_stride)
    report = pretrain_backbone(
        net, train_loops, spec=spec, steps=args.steps, batch_loops=args.batch_loops,
        lr=args.lr, validation=held, seed=args.seed,
    )
    write_pretrained(
        args.out, net, spec=spec, output_stride=args.output_stride, report=report,
        data=loop_data_record(train_loops, held, source=source, simulated=simulated,
                              skipped=loops.skipped),
        batch_loops=args.batch_loops,
    )
    line = (f"pretrained on {train_loops.loops} loops ({len(train_loops)} frames, "
            f"{loops.skipped} instances skipped) in {report.seconds:.0f} s; NT-Xent "
            f"{report.losses[0]:.3f} -> {report.losses[-1]:.3f} (chance "
            f"{chance_loss(min(args.batch_loops, train_loops.loops)):.3f})")
    if report.before is not None and report.after is not None:
        line += (f"; on {held.loops if held else 0} held-out loops, pairs identified "
                 f"{report.before.pair_accuracy:.3f} before, {report.after.pair_accuracy:.3f} "
                 f"after (chance {report.after.chance:.3f})")
    print(f"{line}; wrote {args.out}")
    return 0


def _rewrite(pack: Any, manifest: dict[str, Any], out: Path) -> None:
    extras = {}
    if pack.path is not None:
        for name in ("MODEL_CARD.md", "EVALUATION.md"):
            if (pack.path / name).is_file():
                extras[name] = (pack.path / name).read_text(encoding="utf-8")
    write_pack(out, manifest, [n.state_dict() for n in pack.networks], ood=pack.ood,
               image_ood=pack.image_ood, extra_files=extras)


def cmd_calibrate(args: argparse.Namespace, *, target_sensitivity: float | None = None) -> int:
    pack = ModelPack.load(args.pack, device="cpu")
    if pack.manifest.architecture != "multitask_mobilenet":
        raise SystemExit("calibrate/threshold support multitask_mobilenet packs only")
    frames = _frames(args, _input_size(pack))
    result: CalibrationResult = calibrate_members(
        pack.networks,
        frames,
        spec=pack.input,
        ood=pack.ood,
        target_sensitivity=target_sensitivity,
        ood_tpr=pack.manifest.ood.tpr if pack.manifest.ood and pack.manifest.ood.tpr else 0.95,
    )
    manifest = json.loads(json.dumps(dict(pack.manifest.raw)))
    if target_sensitivity is None:
        manifest = apply_calibration(manifest, result)
    elif result.operating_point is not None:
        manifest["tasks"]["nodule"]["operating_point"] = result.operating_point
    else:
        raise SystemExit(
            "no thyroid frames with both malignant and other nodules to set a threshold"
        )
    out = args.out or args.pack
    _rewrite(pack, manifest, out)
    print(
        json.dumps(
            {
                "ece_before": result.ece_before,
                "ece_after": result.ece_after,
                "nll_before": result.nll_before,
                "nll_after": result.nll_after,
                "frames": result.frames,
                "temperatures": result.temperatures,
                "operating_point": result.operating_point,
                "ood_threshold": result.ood_threshold,
                "pack": str(out),
            },
            indent=2,
        )
    )
    return 0


def cmd_threshold(args: argparse.Namespace) -> int:
    return cmd_calibrate(args, target_sensitivity=args.target_sensitivity)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.acquisition is not None and args.data is not None:
        raise SystemExit("--acquisition changes simulated images: use it with --simulated")
    pack = ModelPack.load(args.pack, device=args.device)
    frames = _frames(args, _input_size(pack), all_vendors=True)
    result = evaluate_pack(pack, frames, held_out_vendor=_held_out())
    if args.acquisition is not None:
        result["acquisition"] = args.acquisition
    out: Path = args.report_dir
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "evaluation.json", to_json(result))
    report = markdown_report(result)
    if args.acquisition is not None:
        report = (f"Every simulated image formed under the acquisition change "
                  f"**{args.acquisition}** of its scanner.\n\n{report}")
    (out / "evaluation.md").write_text(report, encoding="utf-8")
    plots = write_plots(pack, frames, result, out)
    print(report)
    print(
        f"wrote {out / 'evaluation.json'}, {out / 'evaluation.md'} and "
        f"{', '.join(p.name for p in plots)}"
    )
    return 0


def cmd_image_ood(args: argparse.Namespace) -> int:
    """Add (or refit) a pack's image-statistics OOD score on in-distribution studies: 70 % of
    the studies fit it, the other 30 % set its threshold; optionally re-evaluate the pack on
    fresh studies and rewrite its metrics, model card and evaluation report."""
    if args.evaluate_studies and args.evaluate_seed is None:
        raise SystemExit("--evaluate-studies needs --evaluate-seed (a seed the fit never used)")
    pack = ModelPack.load(args.pack, device=args.device)
    frames = (_frames(args, _input_size(pack)) if args.data is not None or not args.simulated
              else simulate_frameset(args.simulated, seed=args.seed,
                                     input_size=_input_size(pack), processes=args.processes))
    fit_part, threshold_part = split_by_study(frames, [0.7, 0.3], seed=args.seed)
    fit = fit_image_ood(fit_part, threshold_part, tpr=args.tpr)
    write_image_ood(args.pack, fit, version=args.version)
    print(f"image statistics fitted on {fit.fit_frames} frames of "
          f"{len(set(fit_part.study.tolist()))} studies ({', '.join(frames.vendors())}); "
          f"threshold {fit.threshold:.3f} keeps {fit.tpr:.1%} of {fit.threshold_frames} frames "
          f"of {len(set(threshold_part.study.tolist()))} other studies")
    if args.evaluate_studies:
        pack = ModelPack.load(args.pack, device=args.device)
        test = simulate_frameset(args.evaluate_studies, seed=args.evaluate_seed,
                                 input_size=_input_size(pack),
                                 vendors=vendor_names(_vendor_styles()),
                                 processes=args.processes)
        held_out = _held_out()
        result = evaluate_pack(pack, test, held_out_vendor=held_out)
        manifest_path = args.pack / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["metrics"] = {
            "test_set": (
                f"{len(test)} frames of {args.evaluate_studies} fresh simulated studies (seed "
                f"{args.evaluate_seed}), all vendors including held-out {held_out}, usual view "
                f"mix ({test.qc_excluded} frames QC would not analyse left out)"),
            **result["summary"],
            "size": manifest.get("metrics", {}).get("size", {}),
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        # The metrics just written do not change the rule: the pack loaded above has it.
        rules = abstention_rules(pack.manifest)
        (args.pack / "MODEL_CARD.md").write_text(model_card(manifest, result, rules),
                                                 encoding="utf-8")
        (args.pack / "EVALUATION.md").write_text(markdown_report(result), encoding="utf-8")
        print(markdown_report(result))
    return 0


def _vendor_styles() -> Any:
    from simulator import VENDOR_STYLES

    return VENDOR_STYLES


def cmd_distill(args: argparse.Namespace) -> int:
    teachers = [ModelPack.load(p, device="cpu") for p in args.teacher]
    for t in teachers:
        if t.manifest.architecture != "multitask_mobilenet":
            raise SystemExit("distill supports multitask_mobilenet teachers only")
    spec = teachers[0].input
    if any((t.input.height, t.input.width) != (spec.height, spec.width) for t in teachers):
        raise SystemExit("distill needs teachers with the same input size")
    frames = _frames(args, (spec.height, spec.width))
    train_set, cal_set, test_set = _three_way_split(frames, args.seed)
    torch.manual_seed(args.seed)
    student = MultiTaskMobileNet(
        width=args.width, pool=args.pool, output_stride=args.output_stride
    )
    teacher_nets = [n for t in teachers for n in t.networks]
    report = train_network(
        student,
        train_set,
        epochs=args.epochs,
        seed=args.seed,
        spec=spec,
        teacher=teacher_nets,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    emb = network_outputs(student, train_set, spec=spec)["embedding"]
    cal = calibrate_members([student], cal_set, spec=spec, train_embeddings=emb)
    teacher_names = ", ".join(f"{t.name} {t.manifest.version}" for t in teachers)
    manifest = multitask_manifest(
        name=args.name,
        version=args.version,
        width=args.width,
        pool=args.pool,
        output_stride=args.output_stride,
        simulated=any(t.manifest.simulated for t in teachers)
        or args.data is None
        or args.simulated_data,
        training_description=(
            f"Distilled from {teacher_names} on {len(train_set)} frames "
            f"({'simulated, seed ' + str(args.seed) if args.data is None else args.data}); "
            "split by study 70/15/15 train/calibration/test."
        ),
        input_size=(spec.height, spec.width),
    )
    manifest = apply_calibration(manifest, cal)
    student_pack = pack_from_networks(manifest, [student], ood=cal.ood)
    held_out = _held_out()
    student_eval = evaluate_pack(student_pack, test_set, held_out_vendor=held_out)
    teacher_pack = teachers[0] if len(teachers) == 1 else _ensemble_pack(teachers)
    teacher_eval = evaluate_pack(teacher_pack, test_set, held_out_vendor=held_out)
    comparison = distillation_report(
        student_pack,
        student_eval,
        teacher_pack,
        teacher_eval,
        test_set,
        teacher_name=teacher_names if len(teachers) == 1 else f"ensemble of {teacher_names}",
    )
    comparison["train_seconds"] = round(report.seconds, 1)
    manifest["metrics"] = {
        "test_set": f"{len(test_set)} frames of held-out studies",
        **student_eval["summary"],
        "size": comparison["student"]["size"],
        "distillation": comparison,
    }
    write_pack(
        args.out,
        manifest,
        [student.state_dict()],
        ood=cal.ood,
        extra_files={
            "MODEL_CARD.md": model_card(manifest, student_eval),
            "EVALUATION.md": markdown_report(student_eval),
        },
    )
    print(distillation_markdown(comparison))
    print(json.dumps(comparison, indent=2))
    return 0


def _ensemble_pack(teachers: Sequence[Any]) -> Any:
    """The teachers as one in-memory ensemble pack (each member keeps its temperatures)."""
    manifest = json.loads(json.dumps(dict(teachers[0].manifest.raw)))
    for name, task in manifest["tasks"].items():
        if task.get("kind") == "classification":
            task["calibration"] = {
                "method": "temperature",
                "temperature": [
                    float(temp) for t in teachers for temp in t.tasks[name].temperatures
                ],
            }
    return pack_from_networks(
        manifest, [n for t in teachers for n in t.networks], ood=teachers[0].ood
    )


def distillation_report(
    student: Any,
    student_eval: dict[str, Any],
    teacher: Any,
    teacher_eval: dict[str, Any],
    frames: Any,
    *,
    teacher_name: str,
) -> dict[str, Any]:
    """Size and test metrics of student and teacher side by side, and how often the student's
    decision (most probable label) agrees with the teacher's on the same frames."""

    def row(pack: Any, evaluation: dict[str, Any]) -> dict[str, Any]:
        overall = evaluation["overall"]
        metrics = {
            task: {k: m[k] for k in ("accuracy", "auc_macro", "malignant_auc") if k in m}
            for task, m in overall.items()
            if isinstance(m, dict) and "accuracy" in m
        }
        size = size_report(pack.networks)
        return {"size": size, "metrics": metrics}

    student_p = student.calibrate_outputs(student_eval["_raw"]).probabilities
    teacher_p = teacher.calibrate_outputs(teacher_eval["_raw"]).probabilities
    agreement = {}
    for task, labels in frames.labels.items():
        mask = labels.numpy() >= 0
        if task in student_p and task in teacher_p and mask.any():
            same = student_p[task][mask].argmax(1) == teacher_p[task][mask].argmax(1)
            agreement[task] = round(float(same.mean()), 4)
    s_row, t_row = row(student, student_eval), row(teacher, teacher_eval)
    return {
        "test_frames": len(frames),
        "student": {"name": student.name, **s_row},
        "teacher": {"name": teacher_name, **t_row},
        "size_ratio": round(s_row["size"]["parameters"] / t_row["size"]["parameters"], 4),
        "agreement_with_teacher": agreement,
    }


def distillation_markdown(comparison: dict[str, Any]) -> str:
    """A Markdown table of :func:`distillation_report`."""
    tasks = list(comparison["teacher"]["metrics"])
    header = ["model", "parameters", "MB (float32)"] + [f"{t} acc." for t in tasks]
    if any("malignant_auc" in comparison["teacher"]["metrics"][t] for t in tasks):
        header.append("malignant AUC")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in ("teacher", "student"):
        row = comparison[key]
        cells = [
            f"{key}: {row['name']}",
            str(row["size"]["parameters"]),
            f"{row['size']['float32_megabytes']:.2f}",
        ]
        cells += [_cell(row["metrics"][t].get("accuracy")) for t in tasks]
        if len(header) > len(tasks) + 3:
            cells.append(_cell(row["metrics"].get("nodule", {}).get("malignant_auc")))
        lines.append("| " + " | ".join(cells) + " |")
    agreement = ", ".join(f"{k} {v:.3f}" for k, v in comparison["agreement_with_teacher"].items())
    return "\n".join(
        [
            *lines,
            "",
            f"Student/teacher size: {comparison['size_ratio']:.3f}; decisions agreeing with the "
            f"teacher on the {comparison['test_frames']} test frames: {agreement}.",
        ]
    )


def _cell(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def cmd_reference(args: argparse.Namespace) -> int:
    result = build_reference_pack(
        args.out,
        seed=args.seed,
        train_studies=args.train_studies,
        calibration_studies=args.calibration_studies,
        test_studies=args.test_studies,
        epochs=args.epochs,
        width=args.width,
        processes=args.processes,
    )
    if args.report is not None:
        _write_json(args.report, to_json(result))
    print(markdown_report(result))
    print(json.dumps(result["train_report"], indent=2))
    return 0


def cmd_drift_reference(args: argparse.Namespace) -> int:
    pack = ModelPack.load(args.pack, device=args.device)
    reference = fit_pack_reference(
        pack,
        studies_per_vendor=args.studies_per_vendor,
        seed=args.seed,
        false_alarms=args.false_alarms,
        cache=args.cache,
        progress=lambda line: print(line, flush=True),
    )
    path = write_reference(args.pack, reference)
    for key, group in reference.groups.items():
        print(f"{key}: {group.studies} studies, {group.images} images, "
              f"{len(group.signals)} signals ({group.charts()} tests)")
    print(f"wrote {path}; the manifest names it with its sha256")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    pack = ModelPack.load(args.pack, device=args.device)
    rng = np.random.default_rng(0)
    frames = [rng.random((300, 400), dtype=np.float32) for _ in range(args.frames)]
    out = {}
    for batch in args.batch_sizes:
        pack.predict(frames[: max(batch, 2)], batch_size=batch)
        started = time.perf_counter()
        pack.predict(frames, batch_size=batch)
        out[f"batch_{batch}_frames_per_s"] = round(len(frames) / (time.perf_counter() - started), 1)
    print(json.dumps({"device": str(pack.device), "torch_threads": torch.get_num_threads(), **out}))
    return 0


# ----------------------------------------------------------------------------------------
def _add_network_args(p: argparse.ArgumentParser, *, width: float) -> None:
    """Shape of the network to train (train) or of the student (distill)."""
    p.add_argument("--width", type=float, default=width, help="width multiplier")
    p.add_argument("--pool", choices=POOLING, default="avgmax", help="pooling for the heads")
    p.add_argument(
        "--output-stride",
        type=int,
        choices=(16, 32),
        default=REFERENCE_OUTPUT_STRIDE,
        help="input pixels per cell of the last feature map",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sononode model", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a multi-task pack")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="pack folder to write")
    p.add_argument("--init-from", type=Path, help="start from this pack's weights (transfer)")
    p.add_argument("--freeze-backbone", action="store_true", help="train the heads only")
    p.add_argument(
        "--from-pretrained",
        type=Path,
        metavar="BACKBONE",
        help="fine-tune a backbone written by 'sononode model pretrain' (its width and output "
        "stride replace --width and --output-stride)",
    )
    p.add_argument(
        "--simulated-data",
        action="store_true",
        help="the --data images are simulated: the pack is flagged not for clinical use",
    )
    p.add_argument("--epochs", type=int, default=20)
    _add_network_args(p, width=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--name", default="sononode-us-custom")
    p.add_argument("--version", default="0.1.0")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "pretrain", help="contrastive pretraining of the backbone on unlabelled cine loops"
    )
    group = p.add_argument_group("loops (a DICOM folder, or simulated loops)")
    group.add_argument("--data", type=Path,
                       help="folder of DICOM files: each multi-frame instance is one loop; no "
                       "labels are read")
    group.add_argument("--simulated", type=int, metavar="N", help="simulate N loops instead")
    group.add_argument("--vendor", action="append",
                       help="vendor style of the simulated loops (repeat; default the "
                       "simulator's training vendors)")
    group.add_argument("--acquisition", choices=ACQUISITION_CHANGES, default=None,
                       help="form the simulated loops under this acquisition change")
    group.add_argument("--simulated-data", action="store_true",
                       help="the --data loops are simulated images")
    group.add_argument("--frames-per-loop", type=int, default=8,
                       help="frames used of each loop, spread evenly")
    group.add_argument("--processes", type=int, default=1, help="simulation processes")
    p.add_argument("--out", type=Path, required=True, help="folder to write the backbone to")
    p.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    p.add_argument("--batch-loops", type=int, default=PRETRAIN_BATCH_LOOPS,
                   help="loops per batch (one positive pair each)")
    p.add_argument("--lr", type=float, default=PRETRAIN_LR)
    p.add_argument("--width", type=float, default=REFERENCE_WIDTH, help="width multiplier")
    p.add_argument("--output-stride", type=int, choices=(16, 32),
                   default=REFERENCE_OUTPUT_STRIDE)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pretrain)

    for name, func, text in (
        ("calibrate", cmd_calibrate, "refit temperatures and the OOD threshold of a pack"),
        ("threshold", cmd_threshold, "set the malignant-nodule operating point"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("pack", type=Path)
        _add_data_args(p)
        p.add_argument("--out", type=Path, help="write here instead of in place")
        if name == "threshold":
            p.add_argument("--target-sensitivity", type=float, required=True)
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="metrics, Markdown report and plots")
    p.add_argument("pack", type=Path)
    _add_data_args(p)
    p.add_argument("--acquisition", choices=ACQUISITION_CHANGES, default=None,
                   help="with --simulated: form every image under this acquisition change "
                   "of its scanner (selective prediction under shift)")
    p.add_argument("--report-dir", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("image-ood", help="fit a pack's image-statistics OOD score on "
                       "in-distribution studies and store it in the pack")
    p.add_argument("pack", type=Path)
    _add_data_args(p)
    p.add_argument("--tpr", type=float, default=0.95,
                   help="share of the held-out in-distribution frames the threshold keeps")
    p.add_argument("--version", default=None, help="give the pack this version")
    p.add_argument("--evaluate-studies", type=int, default=0, metavar="N",
                   help="then evaluate on N fresh simulated studies of every vendor and "
                   "rewrite the pack's metrics, MODEL_CARD.md and EVALUATION.md")
    p.add_argument("--evaluate-seed", type=int, default=None)
    p.add_argument("--processes", type=int, default=2, help="simulation processes")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_image_ood)

    p = sub.add_parser("distill", help="train a smaller student from teacher pack(s)")
    p.add_argument(
        "--teacher",
        type=Path,
        action="append",
        required=True,
        help="teacher pack (repeat for an ensemble)",
    )
    _add_data_args(p)
    _add_network_args(p, width=0.25)
    p.add_argument(
        "--simulated-data",
        action="store_true",
        help="the --data images are simulated: the pack is flagged not for clinical use",
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="sononode-us-student")
    p.add_argument("--version", default="0.1.0")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("reference", help="rebuild the simulated reference pack from scratch")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=REFERENCE_SEED)
    p.add_argument("--train-studies", type=int, default=REFERENCE_TRAIN_STUDIES)
    p.add_argument("--calibration-studies", type=int, default=REFERENCE_CALIBRATION_STUDIES)
    p.add_argument("--test-studies", type=int, default=REFERENCE_TEST_STUDIES)
    p.add_argument("--epochs", type=int, default=REFERENCE_EPOCHS)
    p.add_argument("--width", type=float, default=REFERENCE_WIDTH)
    p.add_argument("--processes", type=int, default=2, help="simulation processes")
    p.add_argument("--report", type=Path, help="write the evaluation JSON here")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("drift-reference",
                       help="fit a pack's drift reference on simulated studies of its vendors")
    p.add_argument("pack", type=Path)
    p.add_argument("--studies-per-vendor", type=int, default=300)
    p.add_argument("--seed", type=int, default=DRIFT_REFERENCE_SEED)
    p.add_argument("--false-alarms", type=float, default=DEFAULT_FALSE_ALARMS,
                   help="target false-alarm episodes per stream and 1000 studies")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep the simulated studies' signals here and reuse them")
    p.set_defaults(func=cmd_drift_reference)

    p = sub.add_parser("info", help="verify a pack and print its manifest summary")
    p.add_argument("pack", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("benchmark", help="frames per second of a pack")
    p.add_argument("pack", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sononode model``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )

    try:
        return int(args.func(args))
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
