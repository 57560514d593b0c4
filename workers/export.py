"""C-STORE SCU: deliver a report to a destination, with typed, retryable failures."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.config import Destination

logger = logging.getLogger(__name__)

#: Warning statuses that still mean the PACS stored the object (PS3.4 B.2.3).
_STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


class ExportError(Exception):
    """Base of export failures."""


class ExportTransientError(ExportError):
    """The destination is unreachable, busy or out of resources: retry later."""


class ExportRefusedError(ExportError):
    """The destination refused the object for good (e.g. SOP class not supported)."""


def send_file(
    path: Path,
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_seconds: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Send the DICOM file at ``path`` to ``destination`` with C-STORE: its status (see
    :func:`send_files`)."""
    (status,) = send_files([path], destination, calling_ae_title=calling_ae_title,
                           timeout_seconds=timeout_seconds, tls=tls)
    return status


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout_seconds: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[int]:
    """Send the DICOM files at ``paths`` to ``destination`` with C-STORE, in order, in one
    association.

    ``tls`` is the client context for a destination marked ``?tls``
    (:func:`node.tls.client_context`); the peer's host name is verified against it.

    Returns
    -------
    list[int]
        The Success or Warning status the destination answered for each file.

    Raises
    ------
    ExportTransientError
        Association refused or aborted, no response, or an Out of Resources status.
    ExportRefusedError
        Any other failure status, or a SOP class the destination does not accept.
    """
    datasets = [dcmread(path) for path in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout_seconds
    ae.dimse_timeout = timeout_seconds
    ae.network_timeout = timeout_seconds
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        syntaxes = dict.fromkeys([*(str(ds.file_meta.TransferSyntaxUID) for ds in datasets
                                    if str(ds.SOPClassUID) == sop_class),
                                  ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(sop_class, list(syntaxes))
    if destination.tls and tls is None:
        raise ExportRefusedError(f"{destination}: TLS requested but no TLS context given")
    tls_args = (tls, destination.host) if destination.tls and tls is not None else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args)
    except (ssl.SSLError, OSError) as exc:
        raise ExportTransientError(f"{destination}: cannot connect ({exc})") from exc
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ExportTransientError(f"{destination}: association rejected")
        raise ExportTransientError(f"{destination}: cannot connect (PACS down?)")
    codes: list[int] = []
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts if cx.result == 0}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                raise ExportRefusedError(
                    f"{destination}: SOP class {ds.SOPClassUID} not accepted")
            codes.append(_checked(destination, ds, assoc.send_c_store(ds)))
    except (ConnectionError, OSError, RuntimeError) as exc:
        raise ExportTransientError(f"{destination}: {exc}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    return codes


def _checked(destination: Destination, ds: Dataset, status: Dataset | None) -> int:
    """The status of one C-STORE, or the error it means."""
    if not status or "Status" not in status:
        raise ExportTransientError(f"{destination}: no response to C-STORE (aborted or timed out)")
    code = int(status.Status)
    if code == 0x0000 or code in _STORED_WARNINGS:
        logger.info("sent %s to %s (status 0x%04X)", ds.SOPInstanceUID, destination, code)
        return code
    comment = str(status.get("ErrorComment", "") or "")
    if 0xA700 <= code <= 0xA7FF:
        raise ExportTransientError(f"{destination}: out of resources 0x{code:04X} {comment}")
    raise ExportRefusedError(f"{destination}: refused with status 0x{code:04X} {comment}")
