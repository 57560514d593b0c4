"""Durable files: temp file, fsync, atomic rename or link, fsync directory.

The node's reports (:func:`write_durably`, written by the report stage) are fsynced and
renamed into place: a crash at any point leaves either no file or the complete file. The
spool of received instances (:class:`Spool`, written by the listener) links a received file
under its name and fsyncs data and folder at once: a crash leaves no file, or an unindexed
one the sender's retry replaces, or the complete file; the file an index row names (the
row is committed after the fsyncs) is complete at every moment.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import cast

logger = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def safe_component(uid: str) -> str:
    """A file-name-safe form of a UID (vendors send malformed UIDs: never trust them as paths)."""
    uid = uid.strip()
    if _SAFE_UID.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the data of the file at ``path`` durable."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range(2)``, which Python's ``os`` does not wrap (``None`` elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", function)


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to the disk,
    without waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing where it is missing).

    A hint, never a durability guarantee: the fsync that follows still decides. Called as
    a received file grows, it makes that fsync write only the file's tail (the idea of
    RocksDB's ``bytes_per_sync``; written by hand: neither ``os`` nor a library wraps the
    call). ctypes releases the interpreter lock for the call.
    """
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: only a hint


def _replace_durably(temp_file: Path, final: Path, *,
                     data_synced: Future[None] | None = None) -> None:
    """fsync ``temp_file`` (or wait for ``data_synced``, an fsync of it already under way),
    rename it to ``final`` (same filesystem), fsync the folder."""
    if data_synced is None:
        fsync_file(temp_file)
    else:
        data_synced.result()
    os.replace(temp_file, final)
    fsync_dir(final.parent)


def _unlink_if_same(name: Path, other: Path) -> None:
    """Remove ``name`` if it is still a link to the file ``other`` names (not a copy another
    association has put there since)."""
    try:
        if name.stat().st_ino == other.stat().st_ino:
            name.unlink()
    except OSError:
        pass


def write_durably(final: Path, write: Callable[[Path], object]) -> Path:
    """Create ``final`` durably: ``write(temp)`` writes a temporary file beside it, which is
    fsynced and renamed into place, and the folder fsynced. Returns ``final``.

    Nothing is left behind when ``write`` fails.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        write(temp)
        _replace_durably(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return final


class Spool:
    """Instances laid out as ``<root>/<study>/<series>/<sop>.dcm``.

    Parameters
    ----------
    root
        The spool directory; created if missing.
    incoming
        Directory for files being received. It must be on the same filesystem as
        ``root`` so that moving a finished file into the spool is an atomic rename.
    """

    def __init__(self, root: Path, incoming: Path) -> None:
        self.root = root
        self.incoming = incoming
        root.mkdir(parents=True, exist_ok=True)
        incoming.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Spool-relative path of an instance."""
        return (
            Path(safe_component(study_uid))
            / safe_component(series_uid)
            / f"{safe_component(sop_uid)}.dcm"
        )

    def absolute(self, relative: str | Path) -> Path:
        """Absolute path of a spool-relative path, refusing anything outside the spool."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"path {relative!r} lies outside the spool")
        return path

    def commit(self, temp_file: Path, relative: Path, *,
               data_synced: Future[None] | None = None) -> Path:
        """Make ``temp_file`` durable and move it to ``relative`` inside the spool.

        When nothing is at ``relative`` yet (the usual case), the file gets its spool name
        first, as a hard link, and its data and the folder are fsynced at the same time (a
        file system commits both in one journal transaction), then the temporary name is
        removed. When a file is already there (an earlier attempt that was never indexed,
        or the same instance arriving over another association at this moment), it is
        replaced only once this file's data is durable: the file a committed index row
        names is durable at every moment. Either way a crash leaves the spool name absent,
        or present but unindexed (replaced when the sender retries), or complete.
        ``data_synced`` is an fsync of ``temp_file`` the caller started earlier (the
        listener overlaps it with parsing the header): it is waited for, not repeated.
        """
        final = self.root / relative
        self._make_dirs(final.parent)
        try:
            os.link(temp_file, final)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                # Across file systems (a misconfigured temp dir): copy, then replace.
                write_durably(final, lambda partial: shutil.copyfile(temp_file, partial))
                temp_file.unlink(missing_ok=True)
            elif exc.errno in (errno.EEXIST, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                # A name already there, or a file system without hard links: the rename
                # after the data's fsync.
                _replace_durably(temp_file, final, data_synced=data_synced)
            else:
                raise
            return final
        try:
            fsync_dir(final.parent)
            if data_synced is None:
                fsync_file(final)
            else:
                data_synced.result()
        except OSError:
            _unlink_if_same(final, temp_file)  # a failed fsync leaves nothing of this file
            raise
        try:
            temp_file.unlink()
        except OSError:  # harmless: the listener sweeps its incoming folder when it starts
            logger.warning("could not remove the temporary name %s", temp_file)
        return final

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and fsync the parent of every folder created (new study/series)."""
        missing = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            fsync_dir(path.parent)

    def sweep_incoming(self, *, others_after_seconds: float = 86400.0) -> int:
        """Delete leftovers of aborted transfers (call when no association is running).

        Everything in this listener's own folder goes; in the folders of other listeners
        sharing the data folder (siblings of :attr:`incoming`, and files beside them from
        before there was one folder per host), only files untouched for
        ``others_after_seconds`` (a listener that is gone: a transfer that is still running
        writes to its file at least every network timeout).
        """
        removed = 0
        for path in self.incoming.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        cutoff = time.time() - others_after_seconds
        for folder in self.incoming.parent.iterdir():
            if folder == self.incoming:
                continue
            for path in folder.iterdir() if folder.is_dir() else [folder]:
                try:
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink(missing_ok=True)
                        removed += 1
                except OSError:
                    continue  # removed meanwhile by its own listener
        if removed:
            logger.info("removed %d partial file(s) from %s", removed, self.incoming)
        return removed

    def write_bytes(self, data: bytes, relative: Path) -> Path:
        """Durably write ``data`` at ``relative`` (used for datasets received in memory)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        temp = self.incoming / f".{os.getpid()}-{relative.name}.tmp"
        with open(temp, "wb") as handle:
            handle.write(data)
        return self.commit(temp, relative)

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem."""
        return shutil.disk_usage(self.root).free
