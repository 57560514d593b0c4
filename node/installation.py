"""The identity of this node installation: a UID generated once and kept in the data dir.

It is the Device Observer UID of every SR the node writes (IHE AIR: the observer device
must be identifiable per installation, not shared by every node of the same software).
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from node.spool import write_durably

UID_FILE = "device-uid"


def installation_uid(data_dir: Path) -> str:
    """The installation's UID, created (durably, once) on first use."""
    path = data_dir / UID_FILE
    if not path.exists():
        uid = str(generate_uid())
        try:
            write_durably(path, lambda temp: temp.write_text(uid + "\n", encoding="ascii"))
        except FileExistsError:
            pass
    return path.read_text(encoding="ascii").strip()
