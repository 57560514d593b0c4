"""SonoNet-16: the published fetal standard-plane classifier, re-implemented in PyTorch.

The network of Baumgartner et al., "SonoNet: Real-Time Detection and Localisation of Fetal
Standard Scan Planes in Freehand Ultrasound", IEEE TMI 2017 (arXiv:1612.05601), whose
weights are published in ``baumgach/SonoNet-weights`` (Apache-2.0): VGG-like, no biases,
batch norm after every convolution, 1x1 adaptation layers producing 14 class maps, global
mean, softmax. Beside it, what the weights expect (STYLE 18): the label order and codes and
the authors' pre-processing of their screen captures (:data:`AUTHORS_CROP`,
:data:`INPUT_SIZE`, grey by channel mean, per-image z-score times :data:`INPUT_SCALE`),
which a pack reproduces through its manifest's input spec.

Converting the published weights into a pack is :mod:`modelkit.sononet_import`; the
weights are data from elsewhere and never part of the repository.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydicom.sr.codedict import codes
from torch import nn

from dicom_sr.codes import PRIVATE_SCHEME
from dicom_sr.model import CodedLabel

if TYPE_CHECKING:
    from pydicom.sr.coding import Code

logger = logging.getLogger(__name__)

#: Network input size ``(rows, columns)``.
INPUT_SIZE: tuple[int, int] = (224, 288)
#: Batch-norm epsilon used by Lasagne when the weights were saved.
BN_EPS = 1e-4
#: Channels of the 3x3 convolutions, block by block (max-pool 2 between blocks).
BLOCKS: tuple[tuple[int, ...], ...] = (
    (16, 16),
    (32, 32),
    (64, 64, 64),
    (128, 128, 128),
    (128, 128, 128),
)
#: Channels of the first 1x1 adaptation convolution (the embedding size).
ADAPTATION_CHANNELS = 64
#: The authors' crop of their example screen captures, ``(c0, r0, c1, r1)``, exclusive end:
#: rows 115..734 and columns 81..874 of a 735 x 975 Voluson E8 capture.
AUTHORS_CROP: tuple[int, int, int, int] = (81, 115, 874, 734)
#: Size ``(rows, columns)`` of those captures: the layout :data:`AUTHORS_CROP` applies to.
AUTHORS_CAPTURE: tuple[int, int] = (735, 975)
#: Scale applied after the per-image z-score (the authors' ``* 255``).
INPUT_SCALE = 255.0
CITATION = (
    "Baumgartner CF, Kamnitsas K, Matthew J, Fletcher TP, Smith S, Koch LM, Kainz B, Rueckert D. "
    '"SonoNet: Real-Time Detection and Localisation of Fetal Standard Scan Planes in Freehand '
    'Ultrasound", IEEE Transactions on Medical Imaging 36(11):2204-2215, 2017 (arXiv:1612.05601).'
)
SOURCE = "baumgach/SonoNet-weights"


class SonoNetLabel(StrEnum):
    """SonoNet-16 outputs, in logit order (the README of the published weights)."""

    THREE_VESSEL = "3VV"
    """Fetal three-vessel view of the heart."""
    FOUR_CHAMBER = "4CH"
    """Fetal four-chamber heart view."""
    ABDOMINAL = "Abdominal"
    """Fetal transverse abdominal plane."""
    BACKGROUND = "Background"
    """No standard plane: the network's abstention class."""
    BRAIN_CB = "Brain (Cb.)"
    """Fetal transcerebellar brain plane."""
    BRAIN_TV = "Brain (Tv.)"
    """Fetal transventricular brain plane."""
    FEMUR = "Femur"
    """Fetal femur plane."""
    KIDNEYS = "Kidneys"
    """Fetal kidneys plane."""
    LIPS = "Lips"
    """Fetal lips (coronal) view."""
    LVOT = "LVOT"
    """Fetal left ventricular outflow tract view."""
    PROFILE = "Profile"
    """Fetal mid-sagittal profile view."""
    RVOT = "RVOT"
    """Fetal right ventricular outflow tract view."""
    SPINE_CORONAL = "Spine (cor.)"
    """Fetal spine, coronal plane."""
    SPINE_SAGITTAL = "Spine (sag.)"
    """Fetal spine, sagittal plane."""


#: Labels in output order.
SONONET_LABELS: tuple[str, ...] = tuple(label.value for label in SonoNetLabel)
#: The label the node never reports (no standard plane in the frame).
ABSTAIN_LABEL = SonoNetLabel.BACKGROUND.value

def _private(value: str, meaning: str) -> CodedLabel:
    return CodedLabel(value, PRIVATE_SCHEME, meaning)


def _standard(code: Code) -> CodedLabel:
    return CodedLabel(code.value, code.scheme_designator, code.meaning)


#: DICOM code of each label. A plane with a standard *view* concept (PS3.16, through
#: pydicom's dictionary) has it; the others keep a private code (value <= 16 characters,
#: DICOM SH): SNOMED CT has anatomic sites (femur, kidney, lip...) and LOINC fetal biometry
#: measurements for them, but no view or plane concept, and a site is not a view.
#: Retired private codes, never to be reused: ``SN16-4CH``, ``SN16-RVOT``.
LABEL_CODES: dict[SonoNetLabel, CodedLabel] = {
    SonoNetLabel.THREE_VESSEL: _private("SN16-3VV", "Fetal three-vessel view"),
    # (399214001, SCT): CID 12226 "Echocardiography Image View" calls it "Apical four
    # chamber"; the fetal four-chamber plane is not always apical, so the meaning is that of
    # CID 6 "Transducer Orientation" and CID 501 "Volumetric View Description".
    SonoNetLabel.FOUR_CHAMBER: _standard(codes.CID501.FourChamber),
    SonoNetLabel.ABDOMINAL: _private("SN16-ABDOMINAL", "Fetal abdominal circumference plane"),
    SonoNetLabel.BACKGROUND: _private("SN16-BACKGROUND", "No fetal standard plane"),
    SonoNetLabel.BRAIN_CB: _private("SN16-BRAIN-CB", "Fetal transcerebellar brain plane"),
    SonoNetLabel.BRAIN_TV: _private("SN16-BRAIN-TV", "Fetal transventricular brain plane"),
    SonoNetLabel.FEMUR: _private("SN16-FEMUR", "Fetal femur plane"),
    SonoNetLabel.KIDNEYS: _private("SN16-KIDNEYS", "Fetal kidneys plane"),
    SonoNetLabel.LIPS: _private("SN16-LIPS", "Fetal lips coronal view"),
    # No LVOT view in SCT or DCM: "Apical long axis" and "Five chamber" show the outflow
    # tract but are other planes.
    SonoNetLabel.LVOT: _private("SN16-LVOT", "Fetal left ventricular outflow tract view"),
    SonoNetLabel.PROFILE: _private("SN16-PROFILE", "Fetal mid-sagittal profile view"),
    # (399195005, SCT) of CID 12226 "Echocardiography Image View".
    SonoNetLabel.RVOT: _standard(codes.CID12226.RightVentricularOutflowTractView),
    SonoNetLabel.SPINE_CORONAL: _private("SN16-SPINE-COR", "Fetal spine coronal plane"),
    SonoNetLabel.SPINE_SAGITTAL: _private("SN16-SPINE-SAG", "Fetal spine sagittal plane"),
}


# ----------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Convolution without bias, batch normalisation, optional ReLU (one Lasagne layer)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class SonoNet16(nn.Module):
    """SonoNet-16 (Baumgartner et al., IEEE TMI 2017).

    Five VGG blocks of 3x3 convolutions (16,16 | 32,32 | 64,64,64 | 128,128,128 |
    128,128,128) with max-pool 2 between blocks, a 1x1 convolution to 64 channels with ReLU
    and a 1x1 convolution to one map per class without ReLU; every convolution is followed
    by batch normalisation and has no bias. Logits are the spatial mean of the class maps.

    Parameters
    ----------
    input_scale
        Factor applied to the input before the first convolution. ``1.0`` (default) for
        inputs already scaled as the authors did (``z-score * 255``); ``255.0`` in a model pack,
        whose ``per_image`` normalisation gives the plain z-score.
    """

    def __init__(self, *, input_scale: float = 1.0) -> None:
        super().__init__()
        if not float(input_scale) > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale!r}")
        self.input_scale = float(input_scale)
        blocks = []
        in_channels = 1
        for widths in BLOCKS:
            layers = []
            for width in widths:
                layers.append(ConvBN(in_channels, width, 3))
                in_channels = width
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.adaptation = ConvBN(in_channels, ADAPTATION_CHANNELS, 1)
        self.classifier = ConvBN(ADAPTATION_CHANNELS, len(SONONET_LABELS), 1, relu=False)

    def layers_in_npz_order(self) -> list[tuple[str, ConvBN]]:
        """``(state-dict prefix, layer)`` in the order of the Lasagne arrays."""
        named: list[tuple[str, ConvBN]] = []
        for b, block in enumerate(self.blocks):
            for i, layer in enumerate(block.children()):
                assert isinstance(layer, ConvBN)
                named.append((f"blocks.{b}.{i}", layer))
        named += [("adaptation", self.adaptation), ("classifier", self.classifier)]
        return named

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network on ``(N, 1, H, W)`` inputs (224 x 288 for the published weights).

        Returns
        -------
        dict
            ``"logits"`` ``(N, 14)``, ``"probabilities"`` ``(N, 14)`` (softmax),
            ``"class_maps"`` ``(N, 14, H/16, W/16)`` and ``"embedding"`` ``(N, 64)`` (the
            globally pooled features before the last 1x1 convolution).
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"SonoNet16 expects (N, 1, H, W) input, got {tuple(x.shape)}")
        if self.input_scale != 1.0:
            x = x * self.input_scale
        for index, block in enumerate(self.blocks):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
        features = self.adaptation(x)
        class_maps = self.classifier(features)
        logits = class_maps.mean(dim=(2, 3))
        return {
            "logits": logits,
            "probabilities": torch.softmax(logits, dim=1),
            "class_maps": class_maps,
            "embedding": features.mean(dim=(2, 3)),
        }
