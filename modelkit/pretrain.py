"""Contrastive pretraining of the multi-task backbone on unlabelled cine loops (USCL-style).

Seed 004 (USCL, Chen et al., MICCAI 2021) pretrains an ultrasound backbone on videos with
no labels: two views made from frames of the same loop are pulled together, views of
other loops pushed apart (SimCLR's NT-Xent loss). Its sample pair generation matters for
ultrasound: frames of one loop are near-duplicates, so a positive pair is built from
*different* frames of the loop mixed with a third one (positive pair interpolation), and a
batch holds one pair per loop, so no negative is another frame of the same loop.

What this module does:

- :func:`positive_pairs`: one pair per loop of a batch, each view a mix of two frames of
  that loop, then :func:`contrastive_augment` (augmentations that matter for ultrasound:
  depth/zoom crop, a time-gain ramp, and :func:`modelkit.train.augment`'s gain, gamma,
  speckle, blur, rotation and probe flip);
- :func:`nt_xent`, the loss, and :func:`pretrain_backbone`, the loop;
- :func:`write_pretrained` / :func:`load_pretrained`: a folder with the backbone's weights
  and ``pretrained.json`` (architecture, input, method, data, validation figures, sha256),
  which ``sononode model train --from-pretrained`` starts from.

NT-Xent and the pair sampler are written here, a few lines each: lightly (MIT) has an
``NTXentLoss``, but it depends on torchvision and pytorch-lightning, whose pins would
replace the CPU build of torch the node installs; the loss is the standard one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from modelkit.loops import LoopSet
from modelkit.train import augment
from workers.models.manifest import (
    InputSpec,
    NormalisationMode,
    PackFormatError,
    PackIntegrityError,
)
from workers.models.nets import MultiTaskMobileNet
from workers.models.preprocess import normalise

logger = logging.getLogger(__name__)

#: An augmentation of a ``(N, 1, H, W)`` batch in ``[0, 1]`` with a generator.
Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

FORMAT = "sononode-pretrained-backbone"
FORMAT_VERSION = 1
WEIGHTS_FILE = "backbone.pt"
INFO_FILE = "pretrained.json"

#: Temperature of NT-Xent. SimCLR's ablation finds 0.1-0.5 best; 0.2 for small batches.
TEMPERATURE = 0.2
#: Size of the projection head's output (the loss is computed there, not on the embedding:
#: SimCLR shows the representation before the projection transfers better).
PROJECTION_DIM = 128
#: Defaults of ``sononode model pretrain``: set once, not tuned, and checked on the simulator
#: with a validation seed that no reported figure uses (``bench/pretrain.py --seed 7``).
PRETRAIN_STEPS = 600
PRETRAIN_BATCH_LOOPS = 32
PRETRAIN_LR = 2e-3
#: Mixing weight of a view's main frame, drawn uniformly (USCL mixes frames of one loop).
MIX_RANGE = (0.5, 1.0)


# ----------------------------------------------------------------------------------------
# Pairs and augmentation
# ----------------------------------------------------------------------------------------
def contrastive_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment a ``(N, 1, H, W)`` batch in ``[0, 1]`` for contrastive learning.

    A depth/zoom crop (70-100 % of the height and width, anywhere in the frame: another
    depth setting or zoom), a time-gain ramp (the gain changes by up to 30 % from the top of
    the image to the bottom, as a sonographer's TGC sliders do), then
    :func:`modelkit.train.augment`.
    """
    n = batch.shape[0]
    scale = torch.rand(n, generator=generator) * 0.3 + 0.7
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    x = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    depth = torch.linspace(-0.5, 0.5, x.shape[2]).view(1, 1, -1, 1)
    slope = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.3
    x = (x * (1 + slope * depth)).clamp(0.0, 1.0)
    return augment(x, generator)


def positive_pairs(
    loops: LoopSet, batch_loops: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``(B, 1, H, W)`` views in ``[0, 1]``, row ``i`` of each from the same loop.

    ``B = min(batch_loops, loops.loops)`` distinct loops; per loop three frames ``a, b, c``
    are drawn (with replacement), and the views are ``l1 a + (1 - l1) b`` and
    ``l2 c + (1 - l2) b`` with ``l1, l2`` uniform in :data:`MIX_RANGE`. Not yet augmented.
    """
    b = min(batch_loops, loops.loops)
    chosen = torch.randperm(loops.loops, generator=generator)[:b]
    starts, counts = loops.starts[chosen], loops.counts[chosen]
    pick = (torch.rand(3, b, generator=generator) * counts).long().clamp_max(counts - 1) + starts
    frames = loops.images[pick.flatten()].float().div_(255.0).view(3, b, 1, *loops.images.shape[1:])
    low, high = MIX_RANGE
    mix = torch.rand(2, b, 1, 1, 1, generator=generator) * (high - low) + low
    first = mix[0] * frames[0] + (1 - mix[0]) * frames[1]
    second = mix[1] * frames[2] + (1 - mix[1]) * frames[1]
    return first, second


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy of ``B`` positive pairs.

    Each of the ``2B`` projections must pick its partner among the other ``2B - 1``
    (cosine similarity / ``temperature``); the loss is the mean cross-entropy. Its value at
    chance is ``log(2B - 1)``.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"need two (B, D) projections with B >= 2, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(similarity, _partners(n).to(z.device))


def _partners(n: int) -> torch.Tensor:
    """Index of each view's partner in ``cat([first views, second views])``."""
    return torch.cat([torch.arange(n, 2 * n), torch.arange(n)])


class ContrastiveNet(nn.Module):
    """The multi-task network's backbone and pooling, then a two-layer projection head."""

    def __init__(self, net: MultiTaskMobileNet, projection_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.net = net
        d = net.embedding_dim
        # Batch norm in the head (SimCLR v2's): the pooled features of a fresh network share
        # a large positive mean, so every pair's cosine similarity starts near 1 and the loss
        # sits at chance for many steps; centring them lets learning start at once.
        self.projection = nn.Sequential(
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
            nn.Linear(d, projection_dim),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding (what the task heads and the OOD scorer read)."""
        return self.net.pool(self.net.backbone(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embed(x))


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
@dataclass
class PairCheck:
    """How well the projections tell positive pairs apart on loops not trained on."""

    loss: float
    pair_accuracy: float
    """Fraction of views whose most similar other view is their partner."""
    chance: float
    """That fraction for random projections: ``1 / (2B - 1)``."""
    pairs: int


def pair_check(
    model: ContrastiveNet,
    loops: LoopSet,
    *,
    spec: InputSpec,
    batch_loops: int,
    batches: int = 4,
    seed: int = 1,
    temperature: float = TEMPERATURE,
    augmentation: Augmentation | None = None,
) -> PairCheck:
    """NT-Xent and pair identification on ``batches`` fixed batches of ``loops``."""
    augment_views = augmentation or contrastive_augment
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    losses, hits, total, chance = [], 0, 0, 0.0
    with torch.inference_mode():
        for _ in range(batches):
            a, b = positive_pairs(loops, batch_loops, generator)
            z1 = model(normalise(augment_views(a, generator), spec))
            z2 = model(normalise(augment_views(b, generator), spec))
            losses.append(float(nt_xent(z1, z2, temperature)))
            z = F.normalize(torch.cat([z1, z2]), dim=1)
            similarity = (z @ z.T).fill_diagonal_(-2.0)
            n = z1.shape[0]
            hits += int((similarity.argmax(1) == _partners(n)).sum())
            total += 2 * n
            chance = 1.0 / (2 * n - 1)
    return PairCheck(float(np.mean(losses)), hits / total, chance, total // 2)


def _estimate_batch_norm(
    model: ContrastiveNet, loops: LoopSet, *, spec: InputSpec, batch_loops: int,
    augmentation: Augmentation, batches: int = 8,
) -> None:
    """Batch-norm running statistics as the cumulative average over ``batches`` batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    generator = torch.Generator().manual_seed(2)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            a, b = positive_pairs(loops, batch_loops, generator)
            model.embed(normalise(augmentation(torch.cat([a, b]), generator), spec))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


@dataclass
class PretrainReport:
    """Loss per logging interval, wall time, and the check on held-out loops before/after."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    before: PairCheck | None = None
    after: PairCheck | None = None


def pretrain_backbone(
    net: MultiTaskMobileNet,
    loops: LoopSet,
    *,
    spec: InputSpec,
    steps: int,
    batch_loops: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    temperature: float = TEMPERATURE,
    validation: LoopSet | None = None,
    seed: int = 0,
    progress: bool = True,
    augmentation: Augmentation | None = None,
) -> PretrainReport:
    """Train ``net``'s backbone in place by NT-Xent on positive pairs of ``loops``.

    AdamW with a linear warm-up and a cosine decay; the projection head is discarded
    afterwards (the task heads are untouched and untrained). With ``validation`` loops,
    :func:`pair_check` runs on them before and after. ``augmentation`` replaces
    :func:`contrastive_augment` (ablations, tests).
    """
    augment_views = augmentation or contrastive_augment
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    if loops.loops < 2 or batch_loops < 2:
        raise ValueError(
            f"contrastive learning needs at least 2 loops per batch, got {loops.loops} loops "
            f"and batch_loops {batch_loops}"
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ContrastiveNet(net)
    report = PretrainReport()
    check_batch = min(batch_loops, validation.loops) if validation is not None else 0
    if validation is not None and check_batch >= 2:
        # A fresh network's batch-norm statistics are those of its initialisation, under
        # which every embedding is the same: estimate them on the loops first, so that
        # "before" is the random network's real figure and not a degenerate tie.
        _estimate_batch_norm(model, loops, spec=spec, batch_loops=batch_loops,
                             augmentation=augment_views)
        report.before = pair_check(model, validation, spec=spec, batch_loops=check_batch,
                                   temperature=temperature, augmentation=augment_views)
    params = [*net.backbone.parameters(), *model.projection.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    started = time.perf_counter()
    interval = max(1, steps // 20)
    running: list[float] = []
    model.train()
    for step in tqdm(range(steps), desc="pretrain", unit="step", disable=not progress,
                     leave=False):
        a, b = positive_pairs(loops, batch_loops, generator)
        x = normalise(augment_views(torch.cat([a, b]), generator), spec)
        z = model(x)
        loss = nt_xent(z[: a.shape[0]], z[a.shape[0]:], temperature)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        optimiser.step()
        scheduler.step()
        running.append(float(loss.detach()))
        if (step + 1) % interval == 0 or step + 1 == steps:
            report.losses.append(float(np.mean(running)))
            logger.info("step %d: NT-Xent %.4f", step + 1, report.losses[-1])
            running = []
    report.steps = steps
    report.seconds = time.perf_counter() - started
    if validation is not None and check_batch >= 2:
        report.after = pair_check(model, validation, spec=spec, batch_loops=check_batch,
                                  temperature=temperature, augmentation=augment_views)
    net.eval()
    return report


# ----------------------------------------------------------------------------------------
# The pretrained backbone on disk
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainedBackbone:
    """A backbone read by :func:`load_pretrained`: its network shape, weights and record."""

    width: float
    output_stride: int
    input: InputSpec
    state: Mapping[str, torch.Tensor]
    info: Mapping[str, Any]
    sha256: str

    def network(self, *, pool: str = "avg") -> MultiTaskMobileNet:
        """A multi-task network with this backbone (task heads freshly initialised)."""
        net = MultiTaskMobileNet(width=self.width, pool=pool, output_stride=self.output_stride)
        net.backbone.load_state_dict(self.state)
        return net

    def summary(self) -> dict[str, Any]:
        """What a pack's manifest records of the backbone it was fine-tuned from."""
        return {
            "sha256": self.sha256,
            "method": self.info.get("method", {}).get("name"),
            "data": self.info.get("data"),
            "validation": self.info.get("validation"),
        }


def write_pretrained(
    out: Path,
    net: MultiTaskMobileNet,
    *,
    spec: InputSpec,
    output_stride: int,
    report: PretrainReport,
    data: Mapping[str, Any],
    batch_loops: int,
    temperature: float = TEMPERATURE,
) -> Path:
    """Write ``backbone.pt`` (the backbone's state dict) and ``pretrained.json`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    torch.save(net.backbone.state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {
            "name": "multitask_mobilenet",
            "params": {"width": net.width, "output_stride": int(output_stride)},
        },
        "input": {
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
            "normalisation": {"mode": spec.normalisation.value, "mean": spec.mean,
                              "std": spec.std},
        },
        "weights": WEIGHTS_FILE,
        "sha256": digest,
        "method": {
            "name": "contrastive, NT-Xent on positive pairs of frames of one loop "
            "(USCL-style pair interpolation)",
            "steps": report.steps,
            "batch_loops": batch_loops,
            "temperature": temperature,
            "projection_dim": PROJECTION_DIM,
            "mix_range": list(MIX_RANGE),
            "loss_curve": [round(x, 4) for x in report.losses],
            "seconds": round(report.seconds, 1),
            "torch_threads": torch.get_num_threads(),
        },
        "data": dict(data),
        "validation": {
            "note": "pair identification on loops held out of pretraining (random projections "
            "score the chance figure)",
            "before": asdict(report.before) if report.before else None,
            "after": asdict(report.after) if report.after else None,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def load_pretrained(folder: Path) -> PretrainedBackbone:
    """Read and verify a folder written by :func:`write_pretrained`.

    Raises
    ------
    PackFormatError
        On a missing or malformed ``pretrained.json`` or weights that do not fit it.
    PackIntegrityError
        When the weights' sha256 is not the recorded one.
    """
    path = folder / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PackFormatError(f"{folder}: no {INFO_FILE}; not a pretrained backbone") from exc
    except (OSError, ValueError) as exc:
        raise PackFormatError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise PackFormatError(f"{path}: not a {FORMAT} record")
    if info.get("format_version") != FORMAT_VERSION:
        raise PackFormatError(
            f"{path}: format_version {info.get('format_version')!r}, this node reads "
            f"{FORMAT_VERSION}"
        )
    try:
        params = info["architecture"]["params"]
        width, stride = float(params["width"]), int(params["output_stride"])
        shape = info["input"]
        norm = shape["normalisation"]
        if norm["mode"] != NormalisationMode.FIXED.value:
            raise ValueError(f"normalisation {norm['mode']!r}; pretraining writes 'fixed'")
        spec = InputSpec(height=int(shape["height"]), width=int(shape["width"]),
                         channels=int(shape["channels"]),
                         normalisation=NormalisationMode.FIXED, mean=float(norm["mean"]),
                         std=float(norm["std"]))
        weights = folder / str(info["weights"])
        recorded = str(info["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackFormatError(f"{path}: incomplete record: {exc}") from exc
    try:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    except OSError as exc:
        raise PackFormatError(f"{weights}: cannot read the weights: {exc}") from exc
    if digest != recorded:
        raise PackIntegrityError(f"{weights}: sha256 {digest} is not the recorded {recorded}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    backbone = PretrainedBackbone(width, stride, spec, state, info, digest)
    try:
        backbone.network()
    except (RuntimeError, ValueError) as exc:
        raise PackFormatError(f"{weights}: weights do not fit the recorded network: {exc}") from exc
    return backbone


def loop_data_record(loops: LoopSet, held_out: LoopSet | None, *, source: str,
                     simulated: bool, skipped: int) -> dict[str, Any]:
    """The ``data`` section of ``pretrained.json`` (``skipped``: instances of the source
    that gave no loop)."""
    return {
        "source": source,
        "simulated": simulated,
        "loops": loops.loops,
        "frames": len(loops),
        "loops_per_vendor": loops.vendor_counts(),
        "held_out_loops": held_out.loops if held_out is not None else 0,
        "skipped_instances": skipped,
        "labels_used": False,
    }


def chance_loss(batch_loops: int) -> float:
    """NT-Xent of uninformative projections for ``batch_loops`` pairs."""
    return math.log(2 * batch_loops - 1)
