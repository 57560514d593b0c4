"""Guards on what a C-STORE may cost the node before its dataset is parsed.

pynetdicom streams a received dataset to a temporary file
(``STORE_RECV_CHUNKED_DATASET``); this module bounds what that may cost:

- **Disk.** When writing the temporary file fails (``ENOSPC``, ``EDQUOT``, ``EIO``) or free
  space falls below a floor, pynetdicom's network thread dies: the peer gets no status, the
  partial file and its descriptor stay behind. :func:`install_guarded_receive` wraps the
  file pynetdicom writes so that the rest of the dataset is discarded, the partial file
  truncated, and the handler answers Out of Resources (:func:`receive_failure`) in an
  association that goes on.
- **Memory.** pydicom inflates a deflated dataset whole, in memory, even to read its
  header: a 1 MB file can inflate to 1 GB. :func:`inflated_size` streams the inflation with
  a bounded buffer and gives up above a limit, before pydicom sees the file.

Written by hand: pynetdicom offers no hook into its chunked receive (the name it creates
the file with, ``pynetdicom.dimse_messages.NamedTemporaryFile``, is replaced here), and
neither pydicom nor zlib bounds an inflation by itself.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path
from typing import IO, Any

import pynetdicom.dimse_messages as _dimse_messages

from node.spool import start_writeback

logger = logging.getLogger(__name__)

#: Transfer syntaxes whose dataset is a raw deflate stream after the file meta group.
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_MAX_META_BYTES = 64 * 1024

#: The name pynetdicom's chunked receive creates its file with (``dimse_messages``).
_FILE_FACTORY = "NamedTemporaryFile"

_failures: dict[str, str] = {}
_failures_lock = threading.Lock()


class InflationLimitExceeded(ValueError):
    """A deflated dataset inflates beyond the configured limit."""


# ----------------------------------------------------------------------------------------
# Disk
# ----------------------------------------------------------------------------------------
class GuardedTempFile:
    """Stands in for the file pynetdicom writes a chunked C-STORE into.

    pynetdicom uses ``write``, ``file.flush``, ``name`` and ``close`` of it
    (``DIMSEMessage.decode_msg``). A failed write, or free space under ``min_free``
    (checked every ``check_every`` bytes), records the failure under the file's name,
    truncates the file to give the space back at once and discards what follows.

    Every ``writeback_every`` bytes flushed, the kernel is asked to start writing them to
    the disk (:func:`node.spool.start_writeback`), so that the fsync before Success finds
    most of the file already written and waits only for its tail. (Every 64 kB cost a
    cine loop of 37 MB 87 ms of CPU against 70 without: ``bench/receive.py --loops 3``.)
    """

    check_every = 8 * 1024 * 1024
    writeback_every = 256 * 1024

    def __init__(self, handle: Any, *, min_free: int) -> None:
        self._handle = handle
        self.name: str = handle.name
        self.min_free = min_free
        self._failed = False
        self._since_check = 0
        self._written = 0
        self._written_back = 0

    @property
    def file(self) -> GuardedTempFile:
        return self

    def _fail(self, reason: str) -> None:
        self._failed = True
        with _failures_lock:
            _failures[self.name] = reason
        logger.error("receiving %s failed (%s); discarding the rest of the dataset",
                     self.name, reason)
        try:
            self._handle.truncate(0)
        except (OSError, AttributeError):
            pass

    def write(self, data: bytes) -> int:
        if self._failed:
            return len(data)
        try:
            self._since_check += len(data)
            if self._since_check >= self.check_every:
                self._since_check = 0
                free = shutil.disk_usage(os.path.dirname(self.name) or ".").free
                if free < self.min_free:
                    self._fail(f"{free} bytes free, under the floor of {self.min_free}")
                    return len(data)
            written: int = self._handle.write(data)
            self._written += written
            return written
        except OSError as exc:
            self._fail(errno.errorcode.get(exc.errno or 0, "EIO"))
            return len(data)

    def flush(self) -> None:
        if self._failed:
            return
        try:
            self._handle.flush()
        except OSError as exc:
            self._fail(errno.errorcode.get(exc.errno or 0, "EIO"))
            return
        if self._written - self._written_back >= self.writeback_every:
            try:
                start_writeback(self._handle.fileno(), self._written_back,
                                self._written - self._written_back)
            except (OSError, AttributeError, ValueError):
                pass  # only a hint
            self._written_back = self._written

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass  # flushing buffered data may hit ENOSPC again

    def __getattr__(self, item: str) -> Any:
        return getattr(self._handle, item)


class _Sink:
    """A file that could not even be created: everything written is dropped."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def truncate(self, size: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def install_guarded_receive(*, min_free: int) -> None:
    """Make pynetdicom's chunked receive fail into :func:`receive_failure` (idempotent)."""
    current = getattr(_dimse_messages, _FILE_FACTORY)
    original = getattr(current, "_original", current)

    def guarded(*args: Any, **kwargs: Any) -> GuardedTempFile:
        try:
            handle = original(*args, **kwargs)
        except OSError as exc:
            guard = GuardedTempFile(_Sink(f"<unwritable-{id(exc):x}>"), min_free=min_free)
            guard._fail(f"cannot create the file: {errno.errorcode.get(exc.errno or 0, 'EIO')}")
            return guard
        return GuardedTempFile(handle, min_free=min_free)

    guarded._original = original  # type: ignore[attr-defined]
    setattr(_dimse_messages, _FILE_FACTORY, guarded)


def receive_failure(path: str | Path) -> str | None:
    """Why receiving the dataset at ``path`` failed, or ``None`` (forgets it once read)."""
    with _failures_lock:
        return _failures.pop(str(path), None)


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------
def _dataset_offset(handle: IO[bytes]) -> tuple[int, str]:
    """Offset of the first byte after the file meta group, and the transfer syntax.

    The group is read element by element (always explicit VR little endian, PS3.10 7.1)
    and ended by its group length when present: deflated bytes can look like a tag.
    """
    handle.seek(0)
    if handle.read(132)[128:] != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no DICM prefix)")
    syntax = ""
    group_end: int | None = None
    while True:
        position = handle.tell()
        if group_end is not None and position >= group_end:
            if position != group_end:
                raise ValueError("file meta group length is inconsistent")
            return position, syntax
        if position - 132 > _MAX_META_BYTES:
            raise ValueError("file meta group too long")
        tag = handle.read(4)
        if len(tag) < 4:
            raise ValueError("file meta group truncated")
        group, element = struct.unpack("<HH", tag)
        if group != 0x0002:
            return position, syntax
        vr = handle.read(2)
        if vr in _LONG_VRS:
            handle.read(2)
            (length,) = struct.unpack("<I", handle.read(4))
        else:
            (length,) = struct.unpack("<H", handle.read(2))
        if length > _MAX_META_BYTES:
            raise ValueError("file meta element too long")
        value = handle.read(length)
        if element == 0x0000 and length == 4:
            group_end = handle.tell() + struct.unpack("<I", value)[0]
        elif element == 0x0010:
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")


def inflated_size(path: str | Path, limit: int, *, chunk: int = 64 * 1024) -> int | None:
    """The inflated size of a deflated file's dataset; ``None`` when it is not deflated.

    Memory stays within ``chunk`` plus 1 MiB whatever the compression ratio.

    Raises
    ------
    InflationLimitExceeded
        Above ``limit`` bytes.
    ValueError
        If the file meta group or the deflate stream is malformed or truncated.
    """
    with open(path, "rb") as handle:
        start, syntax = _dataset_offset(handle)
        if syntax not in DEFLATED_SYNTAXES:
            return None
        handle.seek(start)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
        total = 0
        try:
            while not inflater.eof:
                data = handle.read(chunk)
                if not data:
                    raise ValueError("deflated dataset truncated")
                while data and not inflater.eof:
                    total += len(inflater.decompress(data, 1 << 20))
                    if total > limit:
                        raise InflationLimitExceeded(
                            f"the deflated dataset inflates beyond {limit} bytes")
                    data = inflater.unconsumed_tail
        except zlib.error as exc:
            raise ValueError(f"deflated dataset corrupt ({exc})") from exc
        return total
