"""Networks of the node's own model packs, written in plain PyTorch.

:class:`MultiTaskMobileNet` is a compact MobileNet-style backbone (depthwise-separable
convolutions, batch norm, ReLU6) shared by several task heads:

``view``
    5-way classification of the ultrasound view (:data:`VIEW_LABELS`).
``nodule``
    3-way classification none / benign / malignant of a thyroid nodule. Three classes rather
    than a binary benign/malignant head because inference cannot know whether a nodule is in
    the frame: the head must say so itself. It only applies to thyroid views; the binary
    finding "malignant" is read from ``p(malignant)`` at a Youden operating point.
``lung_pattern``
    3-way classification normal / B-lines / consolidation; applies to the lung view.
``quality``
    Image quality regressed to ``[0, 1]`` (sigmoid output).

``embedding`` is the pooled backbone feature vector, used for out-of-distribution scores
and drift monitoring. :meth:`MultiTaskMobileNet.forward` returns a dict of tensors, logits
for classification tasks (temperature scaling happens outside the network).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from workers.models.sononet import SonoNet16

logger = logging.getLogger(__name__)

#: Label order of the heads of :class:`MultiTaskMobileNet` (index = logit position).
VIEW_LABELS: tuple[str, ...] = (
    "abdomen",
    "thyroid_transverse",
    "thyroid_longitudinal",
    "cardiac_4ch",
    "lung",
)
NODULE_LABELS: tuple[str, ...] = ("none", "benign", "malignant")
LUNG_LABELS: tuple[str, ...] = ("normal", "b_lines", "consolidation")

#: Classification heads: task name -> labels.
CLASSIFICATION_HEADS: Mapping[str, tuple[str, ...]] = {
    "view": VIEW_LABELS,
    "nodule": NODULE_LABELS,
    "lung_pattern": LUNG_LABELS,
}
#: Regression heads (one sigmoid output each).
REGRESSION_HEADS: tuple[str, ...] = ("quality",)
#: Pooling of the last feature map for the heads (see :class:`MultiTaskMobileNet`).
POOLING: tuple[str, ...] = ("avg", "avgmax")

# (output channels at width 1.0, stride) of the depthwise-separable blocks after the stem.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 2),
    (32, 1),
    (64, 2),
    (64, 1),
    (128, 2),
    (128, 1),
    (128, 1),
    (256, 2),
    (256, 1),
)


def _scaled(channels: int, width: float) -> int:
    """Channels at ``width``, rounded to a multiple of 8 (vectorisation friendly), at least 8."""
    return max(8, int(channels * width + 4) // 8 * 8)


class ConvBNReLU(nn.Sequential):
    """Convolution, batch norm, ReLU6."""

    def __init__(
        self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise convolution then 1x1 pointwise convolution (MobileNet v1 block)."""

    def __init__(self, c_in: int, c_out: int, *, stride: int) -> None:
        super().__init__(
            ConvBNReLU(c_in, c_in, stride=stride, groups=c_in),
            ConvBNReLU(c_in, c_out, kernel=1),
        )


class MultiTaskMobileNet(nn.Module):
    """Shared MobileNet-style backbone with view, nodule, lung-pattern and quality heads.

    Parameters
    ----------
    width
        Width multiplier of every layer (1.0 teacher, 0.5 student ...).
    in_channels
        Input channels (1: grey).
    embedding_dim
        Size of the pooled embedding at width 1.0 (scaled by ``width``).
    dropout
        Dropout before the heads (training only).
    pool
        ``"avg"``: the heads read the global average of the last feature map (the
        embedding). ``"avgmax"``: they read the average and the global maximum side by side,
        so that a small bright or dark detail (a microcalcification, a nodule filling a
        few cells of the map) is not averaged away; the embedding stays the average.
    output_stride
        Input pixels per cell of the last feature map: 32 (MobileNet's), or 16, where the
        last downsampling block keeps its resolution (four times the cells, for details
        the size of a nodule's margin; the last blocks cost four times as much).
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        in_channels: int = 1,
        embedding_dim: int = 384,
        dropout: float = 0.2,
        pool: str = "avg",
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if not 0.1 <= width <= 4.0:
            raise ValueError(f"width multiplier must be within [0.1, 4], got {width}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if pool not in POOLING:
            raise ValueError(f"pool must be one of {', '.join(POOLING)}, got {pool!r}")
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        self.width = float(width)
        self.in_channels = in_channels
        self.pool_mode = pool
        c = _scaled(16, width)
        layers: list[nn.Module] = [ConvBNReLU(in_channels, c, stride=2)]
        last_downsampling = max(i for i, (_, stride) in enumerate(_BLOCKS) if stride == 2)
        for i, (channels, stride) in enumerate(_BLOCKS):
            if output_stride == 16 and i == last_downsampling:
                stride = 1
            c_out = _scaled(channels, width)
            layers.append(DepthwiseSeparable(c, c_out, stride=stride))
            c = c_out
        self.embedding_dim = _scaled(embedding_dim, width)
        layers.append(ConvBNReLU(c, self.embedding_dim, kernel=1))
        self.backbone = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        head_in = self.embedding_dim * (2 if pool == "avgmax" else 1)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(head_in, len(labels)) for name, labels in CLASSIFICATION_HEADS.items()}
            | {name: nn.Linear(head_in, 1) for name in REGRESSION_HEADS}
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"embedding": (N, D), "<task>": logits (N, K) or quality (N,)}``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        feature_map = self.backbone(x)
        features = self.pool(feature_map).flatten(1)
        if self.pool_mode == "avgmax":
            hidden = self.dropout(torch.cat([features, feature_map.amax(dim=(2, 3))], dim=1))
        else:
            hidden = self.dropout(features)
        out: dict[str, torch.Tensor] = {"embedding": features}
        for name in CLASSIFICATION_HEADS:
            out[name] = self.heads[name](hidden)
        for name in REGRESSION_HEADS:
            out[name] = torch.sigmoid(self.heads[name](hidden)).squeeze(1)
        return out

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the shared backbone (frozen with ``--freeze-backbone``)."""
        return list(self.backbone.parameters())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def build_network(architecture: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the network named ``architecture`` with keyword ``params``.

    ``"sononet16"`` is imported lazily from :mod:`workers.models.sononet` so that a node
    without that pack never imports it.

    Raises
    ------
    ValueError
        If the architecture is unknown or its parameters are invalid.
    """
    kwargs = dict(params or {})
    try:
        if architecture == "multitask_mobilenet":
            return MultiTaskMobileNet(**kwargs)
        if architecture == "sononet16":
            return SonoNet16(**kwargs)
    except TypeError as exc:
        raise ValueError(
            f"invalid parameters {kwargs!r} for architecture {architecture!r}: {exc}"
        ) from exc
    except ImportError as exc:
        raise ValueError(f"architecture {architecture!r} is not available: {exc}") from exc
    raise ValueError(
        f"unknown architecture {architecture!r} (known: multitask_mobilenet, sononet16)"
    )


KNOWN_ARCHITECTURES: Sequence[str] = ("multitask_mobilenet", "sononet16")
