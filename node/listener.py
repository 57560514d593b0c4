"""Wiring of the DICOM listener: the AE, its contexts, timeouts and limits, its handlers.

The handlers themselves live in :mod:`node.handlers`; this module builds the application
entity and the server that accepts connections, and binds the handlers' collaborators.

What a peer may cost the node is bounded before any association exists:
:class:`GuardedServer` refuses addresses outside ``SONONODE_ALLOWED_PEERS`` and more than
``SONONODE_MAX_ASSOCIATIONS_PER_PEER`` connections from one address, gives every accepted
socket a timeout (pynetdicom's accepted sockets block forever on a peer that stops
mid-PDU), does the TLS handshake in the connection's own thread (pynetdicom does it on the
single accept thread, where one silent peer blocks all others) and creates the
association only once a complete A-ASSOCIATE-RQ has arrived (so half-open connections do
not use up ``maximum_associations``). The called AE title and the calling AE allow-list
are checked by pynetdicom at association time (A-ASSOCIATE-RJ, before any data).
"""

from __future__ import annotations

import logging
import select
import shutil
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, _config, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    register_uid,
    uid_to_service_class,
)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.handlers import (
    Reception,
    StorePolicy,
    handle_echo,
    handle_store,
    set_incoming_dir,
)
from node.metrics import CONNECTIONS_REFUSED
from node.receive import install_guarded_receive
from node.sop_classes import SOPClass
from node.spool import Spool
from node.tls import server_context

if TYPE_CHECKING:
    from ipaddress import IPv4Network, IPv6Network

    from node.config import Settings
    from node.db import Database

logger = logging.getLogger(__name__)

#: Storage classes the node accepts that pynetdicom does not route to its storage service
#: (it would abort every C-STORE of them with "No supported service class available").
_UNKNOWN_TO_PYNETDICOM = {
    SOPClass.US_IMAGE_RETIRED: "UltrasoundImageStorageRetired",
    SOPClass.US_MULTIFRAME_RETIRED: "UltrasoundMultiFrameImageStorageRetired",
}
#: Largest PDU the node accepts: a sender may not put a whole cine loop in one PDU, which
#: pynetdicom reads into memory before the chunked writer sees it.
MAX_PDU_BYTES = 1 << 20
#: Bytes of an A-ASSOCIATE-RQ that must have arrived before an association is created.
_RQ_PROOF_BYTES = 16 * 1024

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


_DEFLATED = "1.2.840.10008.1.2.1.99"


def _preference(uid: str) -> tuple[int, int]:
    if uid in _LOSSLESS_ENCAPSULATED:
        return (0, 0)
    if uid in _UNCOMPRESSED:
        return (1, _UNCOMPRESSED.index(uid))
    if uid == _DEFLATED:
        # Lossless, but pydicom inflates a deflated dataset whole, in memory, to read it.
        return (2, 0)
    return (3, 0)


#: Transfer syntaxes accepted for storage: every one pynetdicom knows (uncompressed,
#: deflated, big endian, JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG/HEVC video).
#: Pixel data the workers cannot decode is still stored and reported by QC.
#:
#: The order matters: pynetdicom, as acceptor, takes the first of *its* syntaxes that the
#: requestor proposed in a context. Lossless compressed syntaxes come first, so a modality
#: that offers its file's own lossless syntax beside an uncompressed fallback sends it as it
#: is (no decompression, less traffic); uncompressed next, then deflated (inflated in memory
#: to be read); lossy syntaxes last, so a sender that could send either never
#: lossy-compresses an image on our account. A lossy original is proposed alone by its
#: sender and is still accepted.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = sorted(ALL_TRANSFER_SYNTAXES, key=_preference)


def register_storage_classes() -> None:
    """Route the accepted classes pynetdicom does not know to its storage service."""
    for uid, keyword in _UNKNOWN_TO_PYNETDICOM.items():
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)


def build_ae(settings: Settings) -> AE:
    """An AE that answers C-ECHO and C-STORE for the classes an ultrasound department sends."""
    # Stream each received dataset to a file instead of memory (cine loops are large).
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's own handlers of every PDU and DIMSE message (bound to each association)
    # log each C-STORE at INFO; the listener logs one line per association instead
    # (node.handlers.Reception). They come back with SONONODE_LOG_LEVEL=DEBUG. pynetdicom's
    # association events (accepted, released, aborted) are logged either way.
    _config.LOG_HANDLER_LEVEL = "standard" if settings.log_level.upper() == "DEBUG" else "none"
    set_incoming_dir(settings.incoming_dir)
    install_guarded_receive(min_free=settings.min_free_bytes)
    register_storage_classes()

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
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.network_timeout_seconds
    ae.dimse_timeout = settings.network_timeout_seconds
    ae.network_timeout = settings.network_timeout_seconds
    ae.maximum_pdu_size = MAX_PDU_BYTES
    # Refused at association time (A-ASSOCIATE-RJ), before a byte of data is received.
    ae.require_called_aet = True
    if settings.calling_ae_whitelist:
        ae.require_calling_aet = list(settings.calling_ae_whitelist)
    return ae


class GuardedRequestHandler(RequestHandler):
    """One connection: TLS handshake, then a complete A-ASSOCIATE-RQ, then the association,
    which runs to its end in this thread (so the server knows when a connection is over)."""

    server: GuardedServer

    def handle(self) -> None:
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            try:
                sock.do_handshake()  # bounded by the socket's timeout
            except (OSError, ssl.SSLError) as exc:
                CONNECTIONS_REFUSED.labels(reason="tls_handshake").inc()
                logger.warning("TLS handshake with %s failed: %s", self.client_address[0],
                               type(exc).__name__)
                return
        elif not self._request_arrived(sock):
            CONNECTIONS_REFUSED.labels(reason="no_request").inc()
            return
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()

    def _request_arrived(self, sock: socket.socket) -> bool:
        """Wait, without consuming it, until an A-ASSOCIATE-RQ is in the socket's buffer,
        at most the ACSE timeout (SO_RCVLOWAT: readable once that many bytes are there)."""
        deadline = time.monotonic() + float(self.ae.acse_timeout or 30)

        def peek(count: int) -> bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                raise TimeoutError
            return sock.recv(count, socket.MSG_PEEK)

        try:
            header = peek(6)
            if len(header) < 6:
                return False
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type != 0x01:
                return False  # not an A-ASSOCIATE-RQ
            need = 6 + min(length, _RQ_PROOF_BYTES)
            return len(peek(need)) == need
        except (TimeoutError, OSError):
            logger.info("no complete A-ASSOCIATE-RQ from %s within %.0f s; closed",
                        self.client_address[0], self.ae.acse_timeout or 30)
            return False
        finally:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the limits of this module's docstring."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, *args: Any, per_peer_limit: int,
                 allowed: tuple[IPv4Network | IPv6Network, ...] = (), reuse_port: bool = False,
                 **kwargs: Any) -> None:
        self.per_peer_limit = per_peer_limit
        self.allowed = allowed
        self.reuse_port = reuse_port
        self._peers: Counter[str] = Counter()
        self._peers_lock = threading.Lock()
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            # Several listener processes on one port (SONONODE_LISTENER_PROCESSES): Linux
            # hands each new connection to one of the sockets bound with SO_REUSEPORT. A
            # process that did not set it (another program) still finds the port taken.
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        if self.allowed and not any(ip_address(host) in net for net in self.allowed):
            CONNECTIONS_REFUSED.labels(reason="address").inc()
            logger.warning("connection from %s refused: not in SONONODE_ALLOWED_PEERS", host)
            return False
        with self._peers_lock:
            if self._peers[host] >= self.per_peer_limit:
                CONNECTIONS_REFUSED.labels(reason="per_peer_limit").inc()
                logger.warning("connection from %s refused: %d open (limit %d)", host,
                               self._peers[host], self.per_peer_limit)
                return False
            self._peers[host] += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)  # returns when the association ends
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            host = str(client_address[0])
            with self._peers_lock:
                self._peers[host] -= 1
                if self._peers[host] <= 0:
                    del self._peers[host]


def refuse_when_disk_low(event: evt.Event, incoming: Path, min_free: int) -> None:
    """EVT_REQUESTED: a transient rejection while the spool's disk is nearly full, so that
    modalities keep their images and retry (they recover by themselves when space returns)."""
    free = shutil.disk_usage(incoming).free
    if free < min_free:
        CONNECTIONS_REFUSED.labels(reason="disk_full").inc()
        logger.warning("association from %s rejected: %d bytes free, under %d",
                       event.assoc.requestor.ae_title, free, min_free)
        event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, provider: local limit
        event.assoc.kill()


def start_listener(
    settings: Settings, db: Database, *, block: bool = True
) -> GuardedServer | None:
    """Start the listener on ``settings.dicom_host:dicom_port``.

    With ``block=False`` returns the server (call ``shutdown()`` on it); otherwise
    serves until interrupted.
    """
    spool = Spool(settings.spool_dir, settings.incoming_dir)
    spool.sweep_incoming()  # aborted transfers of an earlier run leave partial files
    policy = StorePolicy(
        accept_non_ultrasound=settings.accept_non_ultrasound,
        calling_ae_whitelist=tuple(settings.calling_ae_whitelist),
        min_free_bytes=settings.min_free_bytes,
        max_inflated_bytes=settings.max_inflated_bytes,
    )
    ae = build_ae(settings)
    reception = Reception()
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, db, policy, reception]),
        (evt.EVT_CONN_CLOSE, reception.close, [db]),
        (evt.EVT_REQUESTED, refuse_when_disk_low, [settings.incoming_dir,
                                                   settings.min_free_bytes]),
    ]
    tls = server_context(settings)
    server = cast("GuardedServer", ae.make_server(
        (settings.dicom_host, settings.dicom_port),
        evt_handlers=handlers,  # type: ignore[arg-type]
        ssl_context=tls,
        server_class=GuardedServer,
        per_peer_limit=settings.max_associations_per_peer,
        allowed=tuple(settings.allowed_peers),
        reuse_port=settings.listener_process_count > 1,
    ))
    ae._servers.append(server)  # so that ae.shutdown() stops it; shutdown() removes it
    logger.info(
        "DICOM listener %s on %s:%d%s (spool %s)",
        settings.ae_title,
        settings.dicom_host,
        settings.dicom_port,
        " with TLS" + (" (client certificates required)" if settings.dicom_tls_ca else "")
        if tls else "",
        settings.spool_dir,
    )
    if block:
        server.serve_forever()
        return None
    threading.Thread(target=server.serve_forever, name="DICOM listener", daemon=True).start()
    return server
