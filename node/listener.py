"""Wiring of the DICOM listener: the AE, its contexts and timeouts, its handlers.

The handlers themselves live in :mod:`node.handlers`; this module only builds the
application entity and binds its collaborators.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.handlers import StorePolicy, handle_echo, handle_store, set_incoming_dir
from node.sop_classes import SOPClass
from node.spool import Spool

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from node.config import Settings
    from node.db import Database

logger = logging.getLogger(__name__)

#: Syntaxes whose pixel data are bit-exact after decoding (the rest of pynetdicom's
#: encapsulated syntaxes are lossy or may be: JPEG baseline/extended, JPEG-LS near-lossless,
#: JPEG 2000, HTJ2K, MPEG/HEVC video).
_LOSSLESS_ENCAPSULATED = {
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, process 14 SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE Lossless
}
_UNCOMPRESSED = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
]


def _preference(uid: str) -> tuple[int, int]:
    if uid in _LOSSLESS_ENCAPSULATED or uid == "1.2.840.10008.1.2.1.99":  # deflated
        return (0, 0)
    if uid in _UNCOMPRESSED:
        return (1, _UNCOMPRESSED.index(uid))
    return (2, 0)


#: Transfer syntaxes accepted for storage: every one pynetdicom knows (uncompressed,
#: deflated, big endian, JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG/HEVC video).
#: Pixel data the workers cannot decode is still stored and reported by QC.
#:
#: The order matters: pynetdicom, as acceptor, takes the first of *its* syntaxes that the
#: requestor proposed in a context. Lossless compressed syntaxes come first, so a modality
#: that offers its file's own lossless syntax beside an uncompressed fallback sends it as it
#: is (no decompression, less traffic); uncompressed next; lossy syntaxes last, so a sender
#: that could send either never lossy-compresses an image on our account. A lossy original
#: is proposed alone by its sender and is still accepted.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = sorted(ALL_TRANSFER_SYNTAXES, key=_preference)


def build_ae(settings: Settings) -> AE:
    """An AE that answers C-ECHO and C-STORE for the classes an ultrasound department sends."""
    # Stream each received dataset to a file instead of memory (cine loops are large).
    _config.STORE_RECV_CHUNKED_DATASET = True
    set_incoming_dir(settings.incoming_dir)

    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    if settings.accept_non_ultrasound:
        sop_classes = {str(cx.abstract_syntax) for cx in StoragePresentationContexts
                       if cx.abstract_syntax}
        sop_classes.update(c.value for c in SOPClass)
    else:
        sop_classes = {c.value for c in SOPClass}
    # pynetdicom caps the number of supported contexts at 128 per association request,
    # not per AE: every class can carry every syntax.
    for uid in sorted(s for s in sop_classes if s):
        ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
    ae.maximum_associations = 32
    ae.acse_timeout = settings.network_timeout_seconds
    ae.dimse_timeout = settings.network_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs for cine loops
    return ae


def start_listener(
    settings: Settings, db: Database, *, block: bool = True
) -> ThreadedAssociationServer | None:
    """Start the listener on ``settings.dicom_host:dicom_port``.

    With ``block=False`` returns the server (call ``shutdown()`` on it); otherwise
    serves until interrupted.
    """
    spool = Spool(settings.spool_dir, settings.incoming_dir)
    spool.sweep_incoming()  # aborted transfers of an earlier run leave partial files
    policy = StorePolicy(
        accept_non_ultrasound=settings.accept_non_ultrasound,
        calling_ae_whitelist=tuple(settings.calling_ae_whitelist),
    )
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, db, policy]),
    ]
    logger.info(
        "DICOM listener %s on %s:%d (spool %s)",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
        settings.spool_dir,
    )
    return ae.start_server(
        (settings.dicom_host, settings.dicom_port),
        block=block,
        evt_handlers=handlers,  # type: ignore[arg-type]
    )
