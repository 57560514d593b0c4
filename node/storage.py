"""Where the inference workers read instances: the spool, or an S3-compatible object store.

The listener always stores to its local spool, durably (:mod:`node.spool`): Success is
never traded for a network round trip. Workers on other hosts (GPU hosts) read instances
through an :class:`InstanceStore`:

- :class:`SpoolStore` (the default): the spool itself, on a filesystem every worker
  mounts (NFS, CephFS...).
- :class:`S3Store` (``SONONODE_STORAGE_URL=s3://bucket/prefix``): an S3-compatible object
  store (AWS S3, MinIO, Ceph RGW; ``SONONODE_S3_ENDPOINT_URL`` for one that is not AWS,
  credentials from boto3's own chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a
  profile, an instance role). The QC stage, which runs beside the spool, uploads a study's
  analysable instances before it hands the study on; the inference stage on another host
  downloads each to a temporary file, decodes it and deletes the copy. Retention deletes
  the objects with the spooled files.

Transfers, multipart uploads and retries are boto3's (:mod:`boto3.s3.transfer`, standard
retry mode); boto3 checks each part's checksum. What is written here is only the mapping
from spool paths to object keys and the errors the stages act on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from node.config import Settings
    from node.spool import Spool

logger = logging.getLogger(__name__)


class StorageError(Exception):
    """The object store could not be reached or refused a request: worth retrying."""


class InstanceStore(Protocol):
    """Instances by spool-relative path (``<study>/<series>/<sop>.dcm``)."""

    #: What the store is, for logs and ``/ready`` (``spool`` or ``s3://bucket/prefix``).
    name: str
    #: Whether instances must be uploaded for workers on other hosts to read them.
    remote: bool

    def fetch(self, relative: str) -> contextlib.AbstractContextManager[Path]:
        """A local file holding the instance, for the duration of the ``with`` block.

        Raises ``FileNotFoundError`` when the store has no such instance and
        :class:`StorageError` when the store cannot be reached.
        """
        ...

    def upload(self, relative: str, local: Path) -> bool:
        """Make the instance at ``local`` readable at ``relative``; ``False`` when it
        already was (same size). Raises :class:`StorageError`."""
        ...

    def delete(self, relative: str) -> None:
        """Forget the instance (nothing when it is not there). Raises :class:`StorageError`."""
        ...


class SpoolStore:
    """The spool as the store: every worker mounts it (one host, or a shared filesystem)."""

    name = "spool"
    remote = False

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    @contextlib.contextmanager
    def fetch(self, relative: str) -> Iterator[Path]:
        path = self.spool.absolute(relative)
        if not path.is_file():
            raise FileNotFoundError(f"{relative} is not in the spool")
        yield path

    def upload(self, relative: str, local: Path) -> bool:
        return False  # the spool is where the listener wrote it

    def delete(self, relative: str) -> None:
        return None  # retention deletes the spooled file itself


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)`` (prefix without slashes at its ends).

    Raises
    ------
    ValueError
        If the URL is not ``s3://`` or names no valid bucket.
    """
    parts = urlsplit(url)
    bucket = parts.netloc
    if parts.scheme != "s3" or not bucket:
        raise ValueError(f"expected s3://bucket[/prefix], got {url!r}")
    if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in ".-" for c in bucket) \
            or not bucket[0].isalnum() or bucket != bucket.lower():
        raise ValueError(f"{bucket!r} is not a valid bucket name (3-63 lower-case letters, "
                         "digits, dots and hyphens)")
    return bucket, parts.path.strip("/")


class S3Store:
    """Instances as objects ``<prefix>/<study>/<series>/<sop>.dcm`` of one bucket.

    Parameters
    ----------
    url
        ``s3://bucket/prefix``.
    endpoint_url
        The store's endpoint when it is not AWS (MinIO, Ceph, a test server).
    cache_dir
        Where downloaded instances are kept while they are decoded (default: the system's
        temporary directory).
    client
        A boto3 S3 client to use instead of building one (tests).
    """

    remote = True

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 cache_dir: Path | None = None, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.name = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.cache_dir = cache_dir
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise StorageError(
                    "SONONODE_STORAGE_URL is s3:// but boto3 is not installed: "
                    "pip install 'sononode[s3]'") from exc
            client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10, read_timeout=60))
        self.client = client

    def key(self, relative: str) -> str:
        """The object key of a spool-relative path (refusing paths that climb out)."""
        path = PurePosixPath(str(relative).replace(os.sep, "/"))
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"path {relative!r} is not a spool-relative instance path")
        return str(PurePosixPath(self.prefix, path)) if self.prefix else str(path)

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return function(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{what}: not in {self.name}") from exc
            raise StorageError(f"{what} in {self.name}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{what} in {self.name}: {exc}") from exc

    @contextlib.contextmanager
    def fetch(self, relative: str) -> Iterator[Path]:
        key = self.key(relative)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(suffix=".dcm", prefix=".fetch-", dir=self.cache_dir)
        os.close(handle)
        local = Path(name)
        try:
            self._call(f"download of {key}", self.client.download_file,
                       self.bucket, key, str(local))
            yield local
        finally:
            local.unlink(missing_ok=True)

    def upload(self, relative: str, local: Path) -> bool:
        key = self.key(relative)
        size = local.stat().st_size
        try:
            head = self._call(f"lookup of {key}", self.client.head_object,
                              Bucket=self.bucket, Key=key)
            if int(head.get("ContentLength", -1)) == size:
                return False
        except FileNotFoundError:
            pass
        self._call(f"upload of {key}", self.client.upload_file, str(local), self.bucket, key,
                   ExtraArgs={"ContentType": "application/dicom"})
        return True

    def delete(self, relative: str) -> None:
        key = self.key(relative)
        self._call(f"deletion of {key}", self.client.delete_object, Bucket=self.bucket, Key=key)


def open_store(settings: Settings, spool: Spool) -> InstanceStore:
    """The store the settings name: :class:`S3Store` for ``SONONODE_STORAGE_URL``, else the
    spool."""
    if not settings.storage_url:
        return SpoolStore(spool)
    return S3Store(settings.storage_url, endpoint_url=settings.s3_endpoint_url,
                   cache_dir=settings.data_dir / "fetch")
