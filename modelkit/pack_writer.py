"""Writing model packs: weights, statistics and a validated manifest, atomically.

The mirror of :meth:`workers.models.packs.ModelPack.load`: what this writes, the loader
verifies (sha256 of every file, the manifest validated by the same
:class:`~workers.models.manifest.Manifest` before the folder is replaced).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.models.image_statistics import ImageStatisticsScorer
from workers.models.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    OODMethod,
    sha256_file,
)
from workers.models.ood import EnergyScorer, MahalanobisScorer, OODDetector

#: File of a pack's image-statistics OOD scorer.
IMAGE_OOD_FILE = "ood_image_stats.npz"


def write_pack(
    folder: str | Path,
    manifest: Mapping[str, Any],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    ood: OODDetector | None = None,
    image_ood: ImageStatisticsScorer | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a pack atomically: weights, OOD stats, hashes filled into ``manifest``.

    ``manifest`` is a manifest dict without ``members``/``ood.sha256`` (they are computed).
    ``ood`` is the pack's OOD scorer: a Mahalanobis :class:`MahalanobisScorer` is saved as
    ``ood_stats.npz``; an :class:`EnergyScorer` sets ``method``, ``task`` and
    ``temperature``. Threshold and ``tpr`` come from ``manifest["ood"]``. Without ``ood``,
    an energy block of ``manifest`` (which needs no file) is kept and any other dropped.
    The result is validated by :meth:`Manifest.from_dict` before the folder is replaced.
    ``image_ood`` (with ``manifest["ood"]["image"]`` giving its threshold) is saved as
    ``ood_image_stats.npz``; without it the manifest's ``ood.image`` is dropped.
    ``extra_files`` maps file names to text (e.g. ``MODEL_CARD.md``).

    Raises
    ------
    PackFormatError
        If the resulting manifest is invalid (e.g. no OOD threshold).
    """
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a pack is readable like any folder
    try:
        document = json.loads(json.dumps(manifest))
        members = []
        for i, state in enumerate(state_dicts):
            name = "weights.pt" if len(state_dicts) == 1 else f"weights-{i}.pt"
            cpu_state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            torch.save(cpu_state, staging / name)
            members.append({"weights": name, "sha256": sha256_file(staging / name)})
        document["members"] = members
        document["format_version"] = FORMAT_VERSION
        ood_doc = dict(document.get("ood") or {})
        if isinstance(ood, MahalanobisScorer):
            ood_doc.setdefault("method", OODMethod.MAHALANOBIS.value)
            ood_doc["stats"] = "ood_stats.npz"
            ood.save(staging / "ood_stats.npz")
            ood_doc["sha256"] = sha256_file(staging / "ood_stats.npz")
            document["ood"] = ood_doc
        elif isinstance(ood, EnergyScorer):
            ood_doc.update(
                method=OODMethod.ENERGY.value, task=ood.task, temperature=ood.temperature
            )
            document["ood"] = ood_doc
        elif ood_doc.get("method") == OODMethod.ENERGY.value:
            document["ood"] = ood_doc
        else:
            document["ood"] = None
        if document["ood"] is not None:
            if image_ood is not None:
                image_ood.save(staging / IMAGE_OOD_FILE)
                document["ood"]["image"] = {**(document["ood"].get("image") or {}),
                                            "stats": IMAGE_OOD_FILE,
                                            "sha256": sha256_file(staging / IMAGE_OOD_FILE)}
            else:
                document["ood"].pop("image", None)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        Manifest.from_dict(document)
        (staging / MANIFEST_NAME).write_text(
            json.dumps(document, indent=2) + "\n", encoding="utf-8"
        )
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
