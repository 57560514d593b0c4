"""``sononode model info PACK``: a pack's identity and tasks, its files verified.

Reads the manifest (:mod:`workers.models.manifest`) and checks every file's sha256 without
building a network: no torch is imported, so it answers in a fraction of a second on any
machine that has the node installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.models.manifest import PackError, abstention_rules, read_manifest, verify_files


def cmd_info(args: argparse.Namespace) -> int:
    """The pack's identity and tasks, its files verified: read without building a network."""
    try:
        m = read_manifest(args.pack)
        verify_files(args.pack, m)
    except PackError as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 2
    files = sum(f.stat().st_size for f in Path(args.pack).iterdir() if f.is_file())
    size = m.raw.get("metrics", {}).get("size", {})
    info = {
        "name": m.name,
        "version": m.version,
        "sha256": m.sha256,
        "format_version": m.raw.get("format_version"),
        "architecture": m.architecture,
        "params": dict(m.architecture_params),
        "members": len(m.members),
        "parameters": size.get("parameters"),
        "pack_bytes": files,
        "input": {"height": m.input.height, "width": m.input.width, "region": m.input.region.value},
        "tasks": {
            name: {
                "kind": t.kind.value,
                "role": t.role.value,
                "labels": list(t.label_names),
                "temperature": list(t.temperatures),
                "threshold": t.threshold,
                "operating_point": None if t.operating_point is None else vars(t.operating_point),
                "applies_to": t.applies_to,
            }
            for name, t in m.tasks.items()
        },
        "ood": None if m.ood is None else {
            "method": m.ood.method.value, "threshold": m.ood.threshold, "tpr": m.ood.tpr,
            "image": None if m.ood.image is None else {
                "threshold": m.ood.image.threshold, "tpr": m.ood.image.tpr,
                "frames": m.ood.image.frames}},
        "abstention": abstention_rules(m),
        "simulated_training_data": m.simulated,
        "verified": True,
    }
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sononode model info``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="sononode model info",
                                     description="verify a pack and print its manifest summary")
    parser.add_argument("pack", type=Path)
    return cmd_info(parser.parse_args(argv))
