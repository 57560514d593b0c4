"""Does contrastive pretraining on a new vendor's unlabelled loops help on that vendor?

The situation of seed 004 (USCL) at a site: few labelled studies, all of the vendors the
model was trained on, and many unlabelled cine loops of the site's own scanner, a vendor
style the labels never show (the simulator's held-out vendor). Two arms, the same
labelled studies, the same network, initialisation seed, epochs and calibration split:

- **scratch**: train the multi-task network on the labelled studies
  (``sononode model train``);
- **pretrained**: pretrain the backbone contrastively on the unlabelled loops
  (``sononode model pretrain``), then fine-tune on the same labelled studies
  (``train --from-pretrained``).

Both are calibrated on the same held-out labelled studies and evaluated on fresh test
studies of every vendor (another seed: nothing evaluated was fitted on). It prints, for the
new vendor and for the seen ones, accuracy per task, malignant AUC, ECE (with the noise
floor a perfectly calibrated model would show on as many frames), AURC and the fraction of
frames flagged out of distribution, and the paired difference pretrained minus scratch with
a 95 % interval from resampling whole test studies.

Simulated images only: the figures say what the method does on the simulator, not on a
hospital's scanners.

With ``--controls``, two more arms separate the causes: training from scratch for three
times the epochs (about the computation of pretraining plus fine-tuning), and pretraining
on as many unlabelled loops of the *seen* vendors instead of the new one.

    python bench/pretrain.py [--seed 11] [--labelled-studies 120] [--loops 300] \\
        [--test-studies 200] [--steps 600] [--epochs 20] [--controls] [--processes 2] \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkit.calibration import aurc, cluster_bootstrap, expected_calibration_error, roc_auc
from modelkit.data import FrameSet, simulate_frameset, split_by_study
from modelkit.evaluate import pack_inputs
from modelkit.loops import simulate_loopset
from modelkit.pretrain import PRETRAIN_BATCH_LOOPS, PRETRAIN_LR, pretrain_backbone
from modelkit.train import (
    REFERENCE_OUTPUT_STRIDE,
    REFERENCE_POOL,
    REFERENCE_WIDTH,
    apply_calibration,
    calibrate_members,
    default_input_spec,
    multitask_manifest,
    network_outputs,
    pack_from_networks,
    train_network,
)
from simulator import HELD_OUT_VENDOR, TRAINING_VENDORS, VENDOR_STYLES
from workers.models.nets import NODULE_LABELS, MultiTaskMobileNet
from workers.models.packs import ModelPack

TASKS = ("view", "nodule", "lung_pattern")


def _arm(
    net: MultiTaskMobileNet, train: FrameSet, cal: FrameSet, *, epochs: int, seed: int
) -> ModelPack:
    spec = default_input_spec()
    train_network(net, train, epochs=epochs, seed=seed, spec=spec, progress=False)
    embeddings = network_outputs(net, train, spec=spec)["embedding"]
    result = calibrate_members([net], cal, spec=spec, train_embeddings=embeddings)
    manifest = multitask_manifest(
        name="bench-pretrain", version="0", width=net.width, pool=REFERENCE_POOL,
        output_stride=REFERENCE_OUTPUT_STRIDE, simulated=True,
        training_description="bench/pretrain.py arm",
    )
    return pack_from_networks(apply_calibration(manifest, result), [net], ood=result.ood)


def _outputs(pack: ModelPack, frames: FrameSet) -> tuple[dict[str, np.ndarray], np.ndarray]:
    raw = pack.raw_outputs(pack_inputs(pack, frames), batch_size=128)
    calibrated = pack.calibrate_outputs(raw)
    assert calibrated.ood_score is not None and pack.manifest.ood is not None
    flagged = calibrated.ood_score > pack.manifest.ood.threshold
    return dict(calibrated.probabilities), flagged


def _task_statistics(
    task: str, p: np.ndarray, y: np.ndarray
) -> dict[str, Callable[[np.ndarray], float]]:
    """Accuracy, ECE, AURC (and for the nodule the malignant AUC) of one task's frames."""

    def labelled(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = i[y[i] >= 0]
        return p[keep], y[keep]

    def accuracy(i: np.ndarray) -> float:
        q, t = labelled(i)
        return float((q.argmax(1) == t).mean())

    def ece(i: np.ndarray) -> float:
        return expected_calibration_error(*labelled(i))

    def risk_coverage(i: np.ndarray) -> float:
        q, t = labelled(i)
        return aurc(q.max(1), q.argmax(1) == t)

    out: dict[str, Callable[[np.ndarray], float]] = {
        f"{task}_accuracy": accuracy, f"{task}_ece": ece, f"{task}_aurc": risk_coverage,
    }
    if task == "nodule":
        malignant = NODULE_LABELS.index("malignant")

        def malignant_auc(i: np.ndarray) -> float:
            q, t = labelled(i)
            return roc_auc(q[:, malignant], (t == malignant).astype(np.int64))

        out["malignant_auc"] = malignant_auc
    return out


def _statistics(
    probabilities: Mapping[str, np.ndarray], flagged: np.ndarray, frames: FrameSet
) -> dict[str, Callable[[np.ndarray], float]]:
    """Statistics of one arm as functions of frame indices (for the study bootstrap)."""

    def ood_flagged(i: np.ndarray) -> float:
        return float(flagged[i].mean())

    stats: dict[str, Callable[[np.ndarray], float]] = {"ood_flagged": ood_flagged}
    for task in TASKS:
        stats |= _task_statistics(task, probabilities[task], frames.labels[task].numpy())
    return stats


def _difference(
    a: Callable[[np.ndarray], float], b: Callable[[np.ndarray], float]
) -> Callable[[np.ndarray], float]:
    def difference(i: np.ndarray) -> float:
        return a(i) - b(i)

    return difference


def compare(
    arms: Mapping[str, ModelPack], test: FrameSet, *, resamples: int, baseline: str = "scratch"
) -> dict[str, Any]:
    """Per vendor group: each arm's figures and its paired difference from ``baseline`` with
    a 95 % interval from resampling whole test studies."""
    out: dict[str, Any] = {}
    vendors = np.array(test.vendor)
    outputs = {name: _outputs(pack, test) for name, pack in arms.items()}
    groups = {"new vendor (" + HELD_OUT_VENDOR + ")": vendors == HELD_OUT_VENDOR,
              "seen vendors": vendors != HELD_OUT_VENDOR}
    others = [name for name in arms if name != baseline]
    for name, mask in groups.items():
        index = np.nonzero(mask)[0]
        part = test.subset(index)
        stats = {
            arm: _statistics({k: v[index] for k, v in probs.items()}, flags[index], part)
            for arm, (probs, flags) in outputs.items()
        }
        everything = np.arange(len(part))
        row: dict[str, Any] = {"frames": len(part),
                               "studies": int(np.unique(part.study.numpy()).size)}
        for key in stats[baseline]:
            differences = {arm: _difference(stats[arm][key], stats[baseline][key])
                           for arm in others}
            intervals = cluster_bootstrap(part.study.numpy(), differences, resamples=resamples)
            row[key] = {
                "value": {arm: round(stats[arm][key](everything), 4) for arm in arms},
                "difference": {arm: round(f(everything), 4) for arm, f in differences.items()},
                "ci95": {arm: intervals[arm].as_list() if arm in intervals else None
                         for arm in others},
            }
        for task in TASKS:
            row[f"{task}_frames"] = int((part.labels[task] >= 0).sum())
        out[name] = row
    return out


def markdown(result: Mapping[str, Any], *, baseline: str = "scratch") -> str:
    lines = []
    for group, row in result["groups"].items():
        arms = next(v["value"] for v in row.values() if isinstance(v, dict))
        others = [a for a in arms if a != baseline]
        header = ["figure", *arms, *(f"{a} - {baseline} (95 % CI)" for a in others)]
        lines += [f"### {group}: {row['frames']} frames of {row['studies']} studies", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, value in row.items():
            if not isinstance(value, dict):
                continue
            cells = [key, *(f"{value['value'][a]:.3f}" for a in arms)]
            for a in others:
                ci = value["ci95"][a]
                interval = f" ({ci[0]:+.3f} to {ci[1]:+.3f})" if ci else ""
                cells.append(f"{value['difference'][a]:+.3f}{interval}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--labelled-studies", type=int, default=120)
    parser.add_argument("--loops", type=int, default=300)
    parser.add_argument("--frames-per-loop", type=int, default=8)
    parser.add_argument("--test-studies", type=int, default=200)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-loops", type=int, default=PRETRAIN_BATCH_LOOPS)
    parser.add_argument("--lr", type=float, default=PRETRAIN_LR)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--controls", action="store_true",
                        help="two more arms: scratch with 3 x the epochs (as much computation "
                        "as pretraining), and pretraining on as many loops of the seen vendors")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    spec = default_input_spec()
    size = (spec.height, spec.width)
    labelled = simulate_frameset(args.labelled_studies, seed=args.seed, input_size=size,
                                 vendors=list(TRAINING_VENDORS), processes=args.processes,
                                 progress=False)
    train, cal = split_by_study(labelled, [0.75, 0.25], seed=args.seed)
    loops = simulate_loopset(args.loops, seed=args.seed + 1, input_size=size,
                             vendors=[HELD_OUT_VENDOR], frames_per_loop=args.frames_per_loop,
                             processes=args.processes, progress=False)
    pretrain_loops, check_loops = loops.split(0.1, seed=args.seed)
    test = simulate_frameset(args.test_studies, seed=args.seed + 2, input_size=size,
                             vendors=list(VENDOR_STYLES), processes=args.processes,
                             progress=False)
    simulated_s = time.perf_counter() - started
    print(f"simulated in {simulated_s:.0f} s: {len(train)} labelled training frames and "
          f"{len(cal)} calibration frames of {args.labelled_studies} studies of "
          f"{', '.join(TRAINING_VENDORS)}; {pretrain_loops.loops} unlabelled loops "
          f"({len(pretrain_loops)} frames) of {HELD_OUT_VENDOR}, {check_loops.loops} held out; "
          f"{len(test)} test frames of {args.test_studies} studies of all vendors", flush=True)

    t = time.perf_counter()
    torch.manual_seed(args.seed)
    scratch_net = MultiTaskMobileNet(width=REFERENCE_WIDTH, pool=REFERENCE_POOL,
                                     output_stride=REFERENCE_OUTPUT_STRIDE)
    scratch = _arm(scratch_net, train, cal, epochs=args.epochs, seed=args.seed)
    scratch_s = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(args.seed)
    net = MultiTaskMobileNet(width=REFERENCE_WIDTH, pool=REFERENCE_POOL,
                             output_stride=REFERENCE_OUTPUT_STRIDE)
    report = pretrain_backbone(net, pretrain_loops, spec=spec, steps=args.steps,
                               batch_loops=args.batch_loops, lr=args.lr,
                               validation=check_loops, seed=args.seed, progress=False)
    pretrain_s = time.perf_counter() - t
    t = time.perf_counter()
    pretrained = _arm(net, train, cal, epochs=args.epochs, seed=args.seed)
    finetune_s = time.perf_counter() - t

    arms = {"scratch": scratch, "pretrained": pretrained}
    if args.controls:
        torch.manual_seed(args.seed)
        long_net = MultiTaskMobileNet(width=REFERENCE_WIDTH, pool=REFERENCE_POOL,
                                      output_stride=REFERENCE_OUTPUT_STRIDE)
        arms["scratch 3x epochs"] = _arm(long_net, train, cal, epochs=3 * args.epochs,
                                         seed=args.seed)
        seen_loops = simulate_loopset(pretrain_loops.loops, seed=args.seed + 3, input_size=size,
                                      vendors=list(TRAINING_VENDORS),
                                      frames_per_loop=args.frames_per_loop,
                                      processes=args.processes, progress=False)
        torch.manual_seed(args.seed)
        seen_net = MultiTaskMobileNet(width=REFERENCE_WIDTH, pool=REFERENCE_POOL,
                                      output_stride=REFERENCE_OUTPUT_STRIDE)
        pretrain_backbone(seen_net, seen_loops, spec=spec, steps=args.steps,
                          batch_loops=args.batch_loops, lr=args.lr, seed=args.seed,
                          progress=False)
        arms["pretrained on seen-vendor loops"] = _arm(seen_net, train, cal,
                                                       epochs=args.epochs, seed=args.seed)
    result = {
        "seed": args.seed,
        "config": vars(args) | {"json": str(args.json) if args.json else None},
        "pretraining": {
            "nt_xent_first_last": [round(report.losses[0], 4), round(report.losses[-1], 4)],
            "held_out_pair_accuracy_before": report.before.pair_accuracy if report.before
            else None,
            "held_out_pair_accuracy_after": report.after.pair_accuracy if report.after
            else None,
            "chance": report.after.chance if report.after else None,
        },
        "seconds": {"simulation": round(simulated_s, 1), "scratch": round(scratch_s, 1),
                    "pretrain": round(pretrain_s, 1), "fine_tune": round(finetune_s, 1),
                    "torch_threads": torch.get_num_threads()},
        "groups": compare(arms, test, resamples=args.resamples),
    }
    print(json.dumps({k: result[k] for k in ("pretraining", "seconds")}, indent=2))
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
