"""Bearer tokens: who is calling the HTTP service (:mod:`capability.service`).

The capability layer trusts the entity it is given; over HTTP, an entity proves who it is with a token an
operator issued to it (``python -m capability token issue --as ADMIN --entity alice --expires-in 30d``). Only
an admin, the owner of a usable ``sys.mint`` authority, issues, lists and revokes tokens, and each of those acts
is audited under that authority.

A token is ``tok_<id>_<secret>``: the id (16 hex digits) names it in listings, revocations and the audit; the
secret (256 random bits) is shown once, when issued. The store keeps the SHA-256 digest of the whole token,
never the token: a leaked database lets nobody in. A plain hash suffices where a password needs a slow one,
because the secret is random, not chosen by a person. Digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from inference_client.contract import describe_value

from .capabilities import MINT, Capabilities, Capability, check_entity
from .errors import DeniedError, InvalidParamsError, UnauthenticatedError
from .store import Store

TOKEN_PREFIX = "tok_"  # noqa: S105 - the public prefix, not a secret
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
_TOKEN = re.compile(rf"tok_(?P<id>{_TOKEN_ID.pattern})_(?P<secret>[A-Za-z0-9_-]{{43}})")
MAX_TOKEN_LIFETIME_S = 5 * 365 * 86400.0
"""A token lives at most about five years: one that never expires is one nobody remembers to revoke."""
_NO_SUCH_DIGEST = hashlib.sha256(b"no such token").hexdigest()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Token:
    """A token as the store describes it: never its secret."""

    id: str
    entity: str
    issued_by: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> Token:
        return cls(id=row["id"], entity=row["entity"], issued_by=row["issued_by"], created_at=row["created_at"],
                   expires_at=row["expires_at"], revoked_at=row["revoked_at"])

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "entity": self.entity, "issued_by": self.issued_by, "created_at": self.created_at,
                "expires_at": self.expires_at, "revoked": self.revoked_at is not None}


@dataclass(frozen=True)
class IssuedToken:
    """A token just issued: ``token`` is the secret to hand to the entity, shown this once."""

    token: str
    described: Token


class Tokens:
    """Issue, list, revoke and check bearer tokens in a capability store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.capabilities = Capabilities(store)

    def issue(self, admin: str, entity: str, expires_in_s: float) -> IssuedToken:
        """A new token for ``entity``, valid for ``expires_in_s`` seconds from now (by the store's clock)."""
        check_entity(entity)
        if isinstance(expires_in_s, bool) or not isinstance(expires_in_s, (int, float)) \
                or not 0 < expires_in_s <= MAX_TOKEN_LIFETIME_S:
            raise InvalidParamsError(f"expires_in={describe_value(expires_in_s)} is invalid: must be a number of "
                                     f"seconds above 0 and at most {MAX_TOKEN_LIFETIME_S:.0f} (about five years)")
        authority = self._authority(admin, "issue tokens")
        identifier = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}{identifier}_{secrets.token_urlsafe(32)}"
        with self.store.write() as db:
            now = self.store.now(db)
            db.execute("INSERT INTO tokens (id, digest, entity, issued_by, created_at, expires_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (identifier, token_digest(token), entity, admin, now, now + expires_in_s))
            self.capabilities._audit(db, admin, authority.id, "token-issue", "ok", at=now,
                                     detail=f"token {identifier} for {entity}, expires {_when(now + expires_in_s)}")
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (identifier,)).fetchone()
        return IssuedToken(token=token, described=Token.from_row(row))

    def revoke(self, admin: str, token_id: str) -> Token:
        """Refuse the token from now on, on every host sharing the store."""
        authority = self._authority(admin, "revoke tokens")
        identifier = _token_id(token_id)
        if identifier is None:  # not echoed: it may be a token with a secret, mistyped
            raise InvalidParamsError("the token to revoke is not a token id: give the id that token list shows (16 hex "
                                     "digits), or the whole token")
        with self.store.write() as db:
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (identifier,)).fetchone()
            if row is None:
                raise InvalidParamsError(f"no token has the id {identifier}: give one that token list shows")
            now = self.store.now(db)
            db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, identifier))
            self.capabilities._audit(db, admin, authority.id, "token-revoke", "ok", at=now,
                                     detail=f"token {identifier} of {row['entity']}")
            return Token.from_row(db.execute("SELECT * FROM tokens WHERE id = ?", (identifier,)).fetchone())

    def list(self, admin: str, entity: str | None = None) -> list[Token]:
        self._authority(admin, "list tokens")
        if entity is None:
            rows = self.store.read().execute("SELECT * FROM tokens ORDER BY created_at, id")
        else:
            rows = self.store.read().execute("SELECT * FROM tokens WHERE entity = ? ORDER BY created_at, id",
                                             (entity,))
        return [Token.from_row(row) for row in rows]

    def authenticate(self, token: str) -> str:
        """The entity ``token`` was issued to; UnauthenticatedError if it is malformed, unknown, revoked or expired.

        One read: the row and (where the store has a clock in SQL) the time come back together."""
        match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            raise UnauthenticatedError("the bearer token is malformed: a token looks like tok_<16 hex digits>_<43 "
                                       "characters>, as python -m capability token issue printed it")
        db = self.store.read()
        clock = self.store.clock_sql
        select = f"SELECT t.*, {clock} AS now FROM tokens t WHERE id = ?" if clock else \
            "SELECT * FROM tokens WHERE id = ?"  # noqa: S608 - the clock is the store's own SQL
        row = db.execute(select, (match["id"],)).fetchone()
        # Compared even when there is no such id, so that an unknown id takes as long as a wrong secret.
        matches = hmac.compare_digest(token_digest(token), row["digest"] if row else _NO_SUCH_DIGEST)
        if row is None or not matches:
            raise UnauthenticatedError("the bearer token is unknown (or its secret is wrong)")
        now = row["now"] if clock else self.store.now(db)
        if row["revoked_at"] is not None:
            raise UnauthenticatedError(f"token {match['id']} is revoked")
        if row["expires_at"] is not None and row["expires_at"] <= now:
            raise UnauthenticatedError(f"token {match['id']} expired at {_when(row['expires_at'])}")
        return str(row["entity"])

    def _authority(self, admin: str, what: str) -> Capability:
        """A usable sys.mint authority ``admin`` holds: only admins manage tokens."""
        now = self.capabilities.now()
        for capability in self.capabilities.owned(admin):
            if capability.type == MINT and capability.revoked_at is None and (
                    capability.expires_at is None or capability.expires_at > now):
                return capability
        raise DeniedError(f"{describe_value(admin)} may not {what}: only the owner of a {MINT} authority (an admin, "
                          "made by python -m capability init) may")


def _token_id(given: object) -> str | None:
    """The id in what an admin gave to revoke: an id (with or without ``tok_``), or a whole token (a leaked one)."""
    if not isinstance(given, str):
        return None
    whole = _TOKEN.fullmatch(given)
    if whole is not None:
        return whole["id"]
    bare = given.removeprefix(TOKEN_PREFIX)
    return bare if _TOKEN_ID.fullmatch(bare) else None


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
