"""DICOM TLS contexts from the settings (``SONONODE_DICOM_TLS_CERT``, ``_KEY``, ``_CA``).

The listener speaks TLS when a certificate and key are configured; with a CA it requires
client certificates that CA signed (mutual TLS). Exports to a destination marked ``?tls``
verify the PACS's certificate against the CA (the system's trust store without one) and
present the node's certificate when it has one. TLS 1.2 at least, Python's defaults for
ciphers (DCMTK 3.6 and Orthanc negotiate TLS 1.3 with them).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.config import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context, or ``None`` for plain TCP."""
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
    if settings.dicom_tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(settings.dicom_tls_ca))
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context for exports over TLS: the peer's certificate and host name verified."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.dicom_tls_ca) if settings.dicom_tls_ca is not None else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.dicom_tls_cert is not None and settings.dicom_tls_key is not None:
        context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
    return context
