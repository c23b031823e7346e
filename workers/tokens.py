"""API tokens: who calls the REST API, what they may do, and how many of their jobs may run at once.

A token is a random secret (``allot_`` + ``secrets.token_urlsafe(32)``, 256 bits) shown once, when it is
created; the database keeps only its sha256, so a leaked database (or backup) holds no usable secret.
Verification hashes the presented secret and looks the hash up: the secret itself is never compared
byte by byte, so response times say nothing about how much of a guess was right. A revoked token is
refused from the moment ``revoke`` commits.

Scopes: ``read`` (list and read one's own jobs, tasks, studies, graphs) and ``write`` (also submit,
cancel, post feedback, pin and roll back graph versions); ``write`` implies ``read``. A token's
``max_concurrent`` is copied to every job it submits: the queue's per-owner limit.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from graphs.errors import AllotError
from planner.storage import SQLStorage
from planner.storage.tables import TokenRow, utcnow

__all__ = [
    "TOKEN_PREFIX",
    "ApiToken",
    "TokenError",
    "TokenNotFound",
    "TokenScope",
    "TokenStore",
    "hash_token",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "allot_"
"""Every secret starts with this, so it is recognisable in a leak scan (and in a misplaced paste)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_MAX_SECRET = 256
"""Longer presented secrets are refused without hashing: no token is that long."""


class TokenScope(StrEnum):
    READ = "read"
    WRITE = "write"

    def allows(self, needed: TokenScope) -> bool:
        """``write`` implies ``read``."""
        return self is TokenScope.WRITE or needed is TokenScope.READ


class TokenError(AllotError, ValueError):
    """A token cannot be created as asked (bad name, owner or limit; the name is taken)."""


class TokenNotFound(AllotError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "no such token"


class ApiToken(BaseModel):
    """A token as listed and verified: never its secret (nor its hash)."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    owner: str
    scope: TokenScope
    max_concurrent: int | None = None
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_token(secret: str) -> str:
    """The stored form of a secret: its sha256, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _token(row: TokenRow) -> ApiToken:
    assert row.id is not None
    return ApiToken(
        id=row.id,
        name=row.name,
        owner=row.owner,
        scope=TokenScope(row.scope),
        max_concurrent=row.max_concurrent,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class TokenStore:
    """The tokens of one database (``allot_tokens``)."""

    def __init__(self, storage: SQLStorage) -> None:
        if not isinstance(storage, SQLStorage):
            raise TypeError(f"tokens live in an SQL database: got {type(storage).__name__}, use an SQLStorage")
        self.storage = storage

    def create(
        self, name: str, owner: str, scope: TokenScope | str = TokenScope.READ, *, max_concurrent: int | None = None
    ) -> tuple[ApiToken, str]:
        """A new token and its secret: the only time the secret exists outside the caller's hands."""
        if not _NAME.match(name or ""):
            raise TokenError(f"invalid token name {name!r}: letters, digits and _ . : @ - (at most 128, starting alphanumeric)")
        if not _NAME.match(owner or ""):
            raise TokenError(f"invalid owner {owner!r}: letters, digits and _ . : @ - (at most 128, starting alphanumeric)")
        try:
            scope = TokenScope(scope)
        except ValueError:
            raise TokenError(f"invalid scope {scope!r}: read or write") from None
        if max_concurrent is not None and not 1 <= max_concurrent <= 1_000_000:
            raise TokenError(f"max_concurrent must be between 1 and 1000000, got {max_concurrent}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = TokenRow(
            name=name,
            owner=owner,
            token_hash=hash_token(secret),
            scope=scope.value,
            max_concurrent=max_concurrent,
            created_at=utcnow(),
        )
        try:
            with self.storage.transaction(write=True) as session:
                session.add(row)
                session.flush()
                session.refresh(row)
                token = _token(row)
        except IntegrityError:
            raise TokenError(f"a token named {name!r} already exists: pick another name, or revoke it first") from None
        log.info("API token %r created for %s (scope %s)", name, owner, scope.value)
        return token, secret

    def verify(self, secret: str | None) -> ApiToken | None:
        """The live token whose secret this is; ``None`` for an unknown, malformed or revoked one."""
        if not secret or len(secret) > _MAX_SECRET or not secret.startswith(TOKEN_PREFIX):
            return None
        digest = hash_token(secret)
        with self.storage.transaction() as session:
            row = session.exec(select(TokenRow).where(TokenRow.token_hash == digest)).first()
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.token_hash, digest):  # pragma: no cover - the lookup matched it
                return None
            return _token(row)

    def get(self, name: str) -> ApiToken:
        with self.storage.transaction() as session:
            row = session.exec(select(TokenRow).where(TokenRow.name == name)).first()
            if row is None:
                raise TokenNotFound(f"no token named {name!r}")
            return _token(row)

    def list(self, *, include_revoked: bool = True) -> list[ApiToken]:
        """Every token, oldest first; secrets are not stored, so they cannot be listed."""
        query = select(TokenRow).order_by(col(TokenRow.id))
        if not include_revoked:
            query = query.where(col(TokenRow.revoked_at).is_(None))
        with self.storage.transaction() as session:
            return [_token(row) for row in session.exec(query).all()]

    def revoke(self, name: str) -> ApiToken:
        """Refuse the token from now on (revoking a revoked token changes nothing)."""
        with self.storage.transaction(write=True) as session:
            result = session.exec(
                update(TokenRow)  # type: ignore[call-overload]
                .where(TokenRow.name == name, col(TokenRow.revoked_at).is_(None))
                .values(revoked_at=utcnow())
            )
            revoked = result.rowcount == 1
        token = self.get(name)  # TokenNotFound if there is no such token
        if revoked:
            log.info("API token %r of %s revoked", name, token.owner)
        return token
