"""API tokens: who may read, and who may act.

``SONONODE_API_TOKENS`` holds comma-separated ``role:token`` pairs, roles :class:`Role`
``admin`` and ``reader``. A request carries ``Authorization: Bearer <token>``. A reader may
read; replaying, re-analysing, giving feedback and reading the audit trail need an admin.
With no token configured the node still refuses anonymous access to patient data: on
first start it writes an admin token to ``<data>/api-token`` (mode 0600) and says where.
Tokens are kept only as SHA-256 digests in memory, compared in constant time, and never
logged; a request is identified in logs and the audit trail by the digest's first 12 hex
digits.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

logger = logging.getLogger(__name__)

#: File of the generated admin token, inside the data directory.
TOKEN_FILE = "api-token"
#: Tokens shorter than this, or these words, are placeholders, refused outside development.
MIN_TOKEN_LENGTH = 16
PLACEHOLDERS = frozenset({"changeme", "change-me", "secret", "token", "password", "admin",
                          "reader", "test", "example"})


class Role(StrEnum):
    """What a token may do."""

    READER = "reader"
    """Read studies, results, exports, models, drift and metrics."""
    ADMIN = "admin"
    """Also replay exports, re-analyse studies, give feedback, read the audit trail."""


class TokenError(ValueError):
    """``SONONODE_API_TOKENS`` is malformed or holds a placeholder."""


@dataclass(frozen=True)
class Principal:
    """Who made a request."""

    role: Role
    token_id: str
    """First 12 hex digits of the token's SHA-256: names the token without revealing it."""

    def may(self, role: Role) -> bool:
        return self.role is Role.ADMIN or role is Role.READER


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_tokens(text: str, *, development: bool = False) -> dict[str, Role]:
    """``role:token,...`` as digest -> role.

    Raises
    ------
    TokenError
        Naming the entry (by position, never its token) that is malformed or a placeholder.
    """
    tokens: dict[str, Role] = {}
    for position, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        role_text, sep, token = entry.partition(":")
        try:
            role = Role(role_text.strip())
        except ValueError:
            raise TokenError(f"SONONODE_API_TOKENS entry {position}: role must be admin or "
                             f"reader, as role:token") from None
        token = token.strip()
        if not sep or not token:
            raise TokenError(f"SONONODE_API_TOKENS entry {position}: no token after '{role}:'")
        if not development and (len(token) < MIN_TOKEN_LENGTH
                                or token.lower() in PLACEHOLDERS):
            raise TokenError(
                f"SONONODE_API_TOKENS entry {position} ({role}) is a placeholder or shorter "
                f"than {MIN_TOKEN_LENGTH} characters: use a random token (e.g. "
                "'openssl rand -hex 24'), or SONONODE_ENVIRONMENT=development")
        tokens[_digest(token)] = role
    return tokens


def generated_token(data_dir: Path) -> str:
    """The admin token in ``<data>/api-token``, created (random, mode 0600) if missing."""
    path = data_dir / TOKEN_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        logger.warning("no SONONODE_API_TOKENS set: an admin token for the API was written "
                       "to %s (read it from there; it is not logged)", path)
    return path.read_text(encoding="utf-8").strip()


class Authenticator:
    """Maps bearer tokens to principals."""

    def __init__(self, tokens: dict[str, Role]) -> None:
        if not tokens:
            raise TokenError("no API token: every request would be refused")
        self._tokens = tokens

    @classmethod
    def from_settings(cls, configured: str, data_dir: Path, *,
                      development: bool = False) -> Authenticator:
        """The configured tokens, else the generated admin token of the data directory."""
        tokens = parse_tokens(configured, development=development)
        if not tokens:
            tokens = {_digest(generated_token(data_dir)): Role.ADMIN}
        return cls(tokens)

    def principal(self, token: str) -> Principal | None:
        """The principal of ``token``; ``None`` when it is not a known token."""
        digest = _digest(token)
        for known, role in self._tokens.items():
            if hmac.compare_digest(known, digest):
                return Principal(role, digest[:12])
        return None
