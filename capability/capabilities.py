"""Capabilities: mint, delegate (only ever narrower), give, revoke, and the checks made at every use.

A capability is a row of the store. ``sys.mint`` authorities (made by ``init``) mint capabilities of their
namespace; a minted ``diffusers.generate`` capability's parent is its authority, a delegated one's parent is
the capability it was delegated from. At every use the whole chain up to the authority is re-checked: every
link unrevoked and unexpired, every child no wider than its parent, the authority's namespace covering the type.
So an edited row can disable a capability but never widen one.

The library trusts the entity it is given, as a kernel trusts the caller of a script: authenticating entities
is the host application's job.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from inference_client.contract import describe_value

from .errors import ConcurrencyLimitError, DeniedError, InvalidParamsError, UnknownCapabilityError
from .store import Cursor, Db, Store

GENERATE = "diffusers.generate"
MINT = "sys.mint"
ID_PREFIX = "cap_"
MAX_CHAIN_LENGTH = 64
"""Delegation depth limit: a longer chain is refused (and a cycle in an edited store cannot loop forever)."""
MAX_ENTITY_LENGTH = 200
LEASE_SECONDS = 30.0
"""A generation's concurrency slot lasts this long unless renewed; a crashed holder frees it by then."""


def new_capability_id() -> str:
    return ID_PREFIX + secrets.token_urlsafe(24)  # 192 random bits


def check_entity(entity: str, role: str = "entity") -> str:
    if not isinstance(entity, str) or not entity.strip() or len(entity) > MAX_ENTITY_LENGTH:
        raise InvalidParamsError(f"{role} {describe_value(entity)} is invalid: must be a non-empty name of at most "
                                 f"{MAX_ENTITY_LENGTH} characters")
    if not entity.isprintable():
        raise InvalidParamsError(f"{role} {describe_value(entity)} is invalid: must contain printable characters "
                                 "only")
    return entity


def namespace_covers(namespace: str, capability_type: str) -> bool:
    """``diffusers`` covers ``diffusers`` and ``diffusers.generate``, never ``diffusersx.generate``."""
    return capability_type == namespace or capability_type.startswith(namespace + ".")


@dataclass(frozen=True)
class GenerateParams:
    """Parameters of a ``diffusers.generate`` capability. None means "no limit" (or "every model")."""

    server_url: str
    default_model: str
    allowed_models: tuple[str, ...] | None = None
    max_concurrent: int | None = None
    max_width: int | None = None
    max_height: int | None = None
    max_steps: int | None = None

    LIMITS = ("max_concurrent", "max_width", "max_height", "max_steps")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> GenerateParams:
        known = {field.name for field in fields(cls)}
        unknown = sorted(describe_value(name) for name in set(raw) - known - {"expires_at"})
        if unknown:
            # Described, and at most five: a caller's keys may be megabytes long or thousands of them.
            raise InvalidParamsError(f"unknown parameter(s) [{', '.join(unknown[:5])}]; the known ones are "
                                     f"{sorted(known)} and expires_at")
        for required in ("server_url", "default_model"):
            if not isinstance(raw.get(required), str) or not raw[required].strip():
                raise InvalidParamsError(f"{required} is required: a non-empty string")
        params = cls(
            server_url=canonical_server_url(raw["server_url"]),
            default_model=raw["default_model"],
            allowed_models=_model_list(raw.get("allowed_models")),
            **{name: _limit(name, raw.get(name)) for name in cls.LIMITS},
        )
        if params.allowed_models is not None and params.default_model not in params.allowed_models:
            raise InvalidParamsError(f"default_model {describe_value(params.default_model)} is not in allowed_models "
                                     f"{list(params.allowed_models)}")
        return params

    def as_json(self) -> dict[str, Any]:
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        if self.allowed_models is not None:
            values["allowed_models"] = list(self.allowed_models)
        return {key: value for key, value in values.items() if value is not None}

    def narrowed(self, restrictions: Mapping[str, Any]) -> GenerateParams:
        """A child's parameters: this one's, with ``restrictions`` applied; refuse anything wider."""
        merged = self.as_json()
        if "allowed_models" in restrictions and "default_model" not in restrictions:
            # The parent's default may fall outside the narrower list; keep it only if it is inside.
            allowed = restrictions["allowed_models"]
            if isinstance(allowed, list) and allowed and self.default_model not in allowed:
                merged["default_model"] = allowed[0]
        merged.update({key: value for key, value in restrictions.items() if key != "expires_at"})
        child = GenerateParams.parse(merged)
        child.check_within(self)
        return child

    def check_within(self, parent: GenerateParams) -> None:
        """Raise InvalidParamsError unless these parameters grant nothing ``parent`` does not."""
        if self.server_url != parent.server_url:
            raise InvalidParamsError(f"server_url {self.server_url!r} differs from the parent's "
                                     f"{parent.server_url!r}: a delegated capability keeps its server")
        if parent.allowed_models is not None:
            if self.allowed_models is None:
                raise InvalidParamsError(f"allowed_models must be a subset of the parent's "
                                         f"{list(parent.allowed_models)}, not every model")
            extra = sorted(set(self.allowed_models) - set(parent.allowed_models))
            if extra:
                raise InvalidParamsError(f"allowed_models {extra} are not in the parent's "
                                         f"{list(parent.allowed_models)}")
        for name in self.LIMITS:
            mine, theirs = getattr(self, name), getattr(parent, name)
            if theirs is not None and (mine is None or mine > theirs):
                raise InvalidParamsError(f"{name}={mine} is wider than the parent's {theirs}")


def canonical_server_url(url: str) -> str:
    """``http(s)://host:port`` with a lower-case host and an explicit port: keys are bound to this form."""
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname
    except ValueError as error:
        raise InvalidParamsError(f"server_url {describe_value(url)} is invalid: {error}") from None
    if parts.scheme not in {"http", "https"} or not hostname:
        raise InvalidParamsError(f"server_url {describe_value(url)} is invalid: must look like http://127.0.0.1:8000")
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidParamsError(f"server_url {describe_value(url)} is invalid: only scheme, host and port are allowed")
    if not _NETLOC.fullmatch(parts.netloc):  # urlsplit itself is lenient, e.g. with "[::1]x:80"
        raise InvalidParamsError(f"server_url {describe_value(url)} is invalid: {describe_value(parts.netloc)} is not "
                                 "host[:port]")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise InvalidParamsError(f"server_url {describe_value(url)} is invalid: the port must be 1 to 65535")
    host = hostname.lower()
    if not _valid_host(host, bracketed=parts.netloc.rsplit("@", 1)[-1].startswith("[")):
        raise InvalidParamsError(f"server_url {describe_value(url)} is invalid: {describe_value(host)} is not a host "
                                 "name or IP address")
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


_NETLOC = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:@/]+)(:[0-9]+)?")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _valid_host(host: str, bracketed: bool) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return not bracketed and len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))
    return bracketed == (address.version == 6)


def _model_list(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise InvalidParamsError(f"allowed_models={describe_value(value)} is invalid: must be a non-empty list of "
                                 "model ids")
    return tuple(dict.fromkeys(value))


def _limit(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParamsError(f"{name}={describe_value(value)} is invalid: must be a positive integer")
    return value


def parse_expiry(value: Any, now: float) -> float | None:
    if value is None:
        return None
    invalid = InvalidParamsError(f"expires_at={describe_value(value)} is invalid: must be a time in seconds since "
                                 "the epoch")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float (JSON allows it): no time, rather than a crash
        raise invalid from None
    if not math.isfinite(seconds):
        raise invalid
    if seconds <= now:
        raise InvalidParamsError(f"expires_at={value!r} is invalid: it is already past")
    return seconds


@dataclass(frozen=True)
class Capability:
    id: str
    type: str
    owner: str
    params: dict[str, Any]
    parent_id: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Capability:
        return cls(id=row["id"], type=row["type"], owner=row["owner"], params=json.loads(row["params"]),
                   parent_id=row["parent_id"], created_at=row["created_at"], expires_at=row["expires_at"],
                   revoked_at=row["revoked_at"])

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "owner": self.owner, "params": self.params,
                "parent_id": self.parent_id, "created_at": self.created_at, "expires_at": self.expires_at,
                "revoked": self.revoked_at is not None}


@dataclass(frozen=True)
class Grant:
    """What a successful check yields: the capability, its checked parameters and its chain to the authority."""

    capability: Capability
    params: GenerateParams
    chain: tuple[Capability, ...]


class Capabilities:
    """The operations on capabilities, over one store."""

    def __init__(self, store: Store, clock: Callable[[], float] | None = None) -> None:
        """``clock``: a stand-in for the store's clock (:meth:`Store.now`), for tests of expiry."""
        self.store = store
        self.clock = clock

    def now(self) -> float:
        """The time by which expiry is judged: the store's (the database server's, for PostgreSQL)."""
        return self._now()

    def _now(self, db: Db | None = None) -> float:
        if self.clock is not None:
            return self.clock()
        return self.store.now(self.store.read() if db is None else db)

    # --- authorities ---------------------------------------------------------------------------------------

    def create_authority(self, admin: str, namespace: str = "diffusers") -> Capability:
        """A ``sys.mint`` authority for ``namespace``, owned by ``admin`` (the CLI's ``init``)."""
        check_entity(admin, "admin")
        if not namespace or not all(part.isidentifier() for part in namespace.split(".")):
            raise InvalidParamsError(f"namespace {namespace!r} is invalid: must be dotted names like 'diffusers'")
        with self.store.write() as db:
            return self._insert(db, MINT, admin, {"namespace": namespace}, parent_id=None, expires_at=None,
                                now=self._now(db))

    def mint(self, entity: str, authority_id: str, params: Mapping[str, Any],
             capability_type: str = GENERATE) -> Capability:
        now = self._now()
        with self._recording_denials(entity, authority_id, "mint"):
            check_entity(entity)
            if capability_type != GENERATE:
                raise InvalidParamsError(f"type {capability_type!r} cannot be minted: only {GENERATE!r} is known")
            generate = GenerateParams.parse(params)
            expires_at = parse_expiry(params.get("expires_at"), now)
        with self._recording_denials(entity, authority_id, "mint"), self.store.write() as db:
            authority = self._held(db, entity, authority_id, "mint with")
            self._check_usable(authority, now)
            if authority.type != MINT:
                raise DeniedError(f"capability {authority_id!r} is a {authority.type}, not a {MINT} authority")
            namespace = authority.params.get("namespace", "")
            if not namespace_covers(namespace, capability_type):
                raise DeniedError(f"authority {authority_id!r} mints in namespace {namespace!r}, which does not "
                                  f"cover {capability_type!r}")
            minted = self._insert(db, capability_type, entity, generate.as_json(), parent_id=authority_id,
                                  expires_at=expires_at, now=now)
            self._audit(db, entity, minted.id, "mint", "ok", detail=f"by authority {authority_id}", at=now)
            return minted

    # --- delegation, transfer, revocation --------------------------------------------------------------------

    def delegate(self, entity: str, capability_id: str, restrictions: Mapping[str, Any]) -> Capability:
        """A child capability owned by ``entity``, never wider than its parent in any respect."""
        now = self._now()
        with self._recording_denials(entity, capability_id, "delegate"), self.store.write() as db:
            grant = self._grant(db, entity, capability_id, now, "delegate")
            params = grant.params.narrowed(restrictions)
            parent_expiry = min((link.expires_at for link in grant.chain if link.expires_at), default=None)
            expires_at = parse_expiry(restrictions.get("expires_at"), now)
            if expires_at is not None and parent_expiry is not None and expires_at > parent_expiry:
                raise InvalidParamsError(f"expires_at={expires_at} is later than the parent's {parent_expiry}")
            child = self._insert(db, GENERATE, entity, params.as_json(), parent_id=capability_id,
                                 expires_at=expires_at or parent_expiry, now=now)
            self._audit(db, entity, child.id, "delegate", "ok", detail=f"from {capability_id}", at=now)
            return child

    def give(self, entity: str, capability_id: str, recipient: str) -> Capability:
        """Move ownership to ``recipient``: the giver can no longer use, delegate or give it."""
        now = self._now()
        with self._recording_denials(entity, capability_id, "give"), self.store.write() as db:
            check_entity(recipient, "recipient")
            capability = self._held(db, entity, capability_id, "give")
            self._check_usable(capability, now)
            kept = [row["id"] for row in db.execute(
                """WITH RECURSIVE below(id) AS (
                       SELECT id FROM capabilities WHERE parent_id = ?
                       UNION SELECT c.id FROM capabilities c JOIN below b ON c.parent_id = b.id)
                   SELECT c.id FROM capabilities c JOIN below b ON c.id = b.id
                   WHERE c.owner = ? AND c.revoked_at IS NULL""", (capability_id, entity))]
            if kept:
                # Otherwise the giver would keep the same rights through a copy delegated to itself.
                raise DeniedError(f"cannot give capability {capability_id!r} while {entity!r} holds capabilities "
                                  f"delegated from it ({', '.join(kept)}): revoke or give those first")
            db.execute("UPDATE capabilities SET owner = ? WHERE id = ?", (recipient, capability_id))
            self._audit(db, entity, capability_id, "give", "ok", detail=f"to {recipient}", at=now)
            return self._load(db, capability_id)

    def revoke(self, entity: str, capability_id: str) -> list[str]:
        """Disable the capability and all its descendants. Allowed to its owner and to any ancestor's owner."""
        now = self._now()
        with self._recording_denials(entity, capability_id, "revoke"), self.store.write() as db:
            capability = self._find(db, capability_id)
            owners = {link.owner for link in self._chain(db, capability)} if capability else set()
            if capability is None or entity not in owners:
                raise UnknownCapabilityError(f"capability {describe_value(capability_id)} is neither held by "
                                  f"{describe_value(entity)} nor below a capability it holds")
            subtree = [row["id"] for row in db.execute(
                """WITH RECURSIVE subtree(id) AS (
                       SELECT CAST(? AS TEXT)
                       UNION SELECT c.id FROM capabilities c JOIN subtree s ON c.parent_id = s.id)
                   SELECT id FROM subtree""", (capability_id,))]
            db.executemany("UPDATE capabilities SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                           [(now, identifier) for identifier in subtree])
            self._audit(db, entity, capability_id, "revoke", "ok", detail=f"{len(subtree)} capabilities disabled",
                        at=now)
            return subtree

    # --- reading -----------------------------------------------------------------------------------------

    def show(self, entity: str, capability_id: str) -> Capability:
        with self._recording_denials(entity, capability_id, "show"):
            return self._held(self.store.read(), entity, capability_id, "show")

    def owned(self, entity: str) -> list[Capability]:
        if isinstance(entity, str) and not _is_utf8(entity):  # check_entity refused such owners: none can match
            return []
        rows = self.store.read().execute(
            "SELECT * FROM capabilities WHERE owner = ? ORDER BY created_at, id", (entity,))
        return [Capability.from_row(row) for row in rows]

    def audit_log(self, entity: str, capability_id: str) -> list[dict[str, Any]]:
        """Uses and denials recorded for a capability ``entity`` holds (or one below it)."""
        db = self.store.read()
        capability = self._find(db, capability_id)
        with self._recording_denials(entity, capability_id, "audit"):
            if capability is None or entity not in {link.owner for link in self._chain(db, capability)}:
                raise UnknownCapabilityError(f"capability {describe_value(capability_id)} is not held by "
                                             f"{describe_value(entity)}")
        rows = db.execute("SELECT * FROM audit WHERE capability_id = ? ORDER BY id", (capability_id,))
        return [dict(row) for row in rows]

    def audit_entries(self, reader: str, *, capability_id: str | None = None, entity: str | None = None,
                      action: str | None = None, outcome: str | None = None, since: float | None = None,
                      until: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit entries ``reader`` may read that match every filter given, oldest first.

        ``reader`` reads the entries of every capability it holds and of everything below them (so an
        authority's owner reads all that was minted from it and delegated further), as :meth:`audit_log` and
        :meth:`revoke` decide; a capability it gave away is no longer its to read. ``capability_id``: that
        capability's entries only, refused (and the refusal recorded) unless ``reader`` may read it, with the
        same answer for a made-up id and someone else's. ``entity``: entries of that acting entity;
        ``since`` (inclusive) and ``until`` (exclusive): Unix times; ``limit``: the most recent that many.
        """
        if limit is not None and limit < 1:
            raise InvalidParamsError(f"limit={limit} is invalid: must be a positive number of entries")
        if since is not None and until is not None and since >= until:
            raise InvalidParamsError(f"since={_when(since)} is invalid: must be before until={_when(until)}")
        db = self.store.read()
        if capability_id is not None:
            capability = self._find(db, capability_id)
            with self._recording_denials(reader, capability_id, "audit"):
                if capability is None or reader not in {link.owner for link in self._chain(db, capability)}:
                    raise UnknownCapabilityError(f"capability {describe_value(capability_id)} is not held by "
                                      f"{describe_value(reader)}")
        if not all(_is_utf8(text) for text in (reader, entity, action, outcome) if isinstance(text, str)):
            return []  # SQLite cannot bind a lone surrogate, and no stored name holds one
        rows = db.execute(_AUDIT_QUERY, {
            "reader": reader, "capability_id": capability_id, "entity": entity, "action": action,
            "outcome": outcome, "since": since, "until": until, "limit": _NO_LIMIT if limit is None else limit})
        return [dict(row) for row in rows]

    # --- use ---------------------------------------------------------------------------------------------------

    def authorize(self, entity: str, capability_id: str) -> Grant:
        """Check that ``entity`` may generate with ``capability_id`` now; record a denial if not."""
        db = self.store.read()
        now = self._now(db)
        try:
            return self._grant(db, entity, capability_id, now, "use", loaded=self._chain_rows(db, capability_id))
        except DeniedError as error:
            self.record(entity, capability_id, "generate", "denied", detail=str(error))
            raise

    def record(self, entity: str, capability_id: str | None, action: str, outcome: str, *,
               model: str | None = None, width: int | None = None, height: int | None = None,
               steps: int | None = None, detail: str | None = None) -> None:
        with self.store.write() as db:
            self._audit(db, entity, capability_id, action, outcome, model=model, width=width, height=height,
                        steps=steps, detail=detail)

    def acquire_slot(self, entity: str, capability_id: str) -> str:
        """Re-check the grant and take one concurrency slot counted against every capability of its chain.

        Both happen in one write transaction, just before the server call: a revocation, expiry or give that
        came after :meth:`authorize` is seen here. The rule: an excess generation is refused at once (it does
        not queue). Slots are leases that expire after :data:`LEASE_SECONDS` unless renewed, so a holder that
        dies frees its slot by then.
        """
        with self.store.write() as db:
            # Leases that expired are swept before the chain's lock is taken: the lock is held as briefly as can be.
            self._sweep_expired_leases(db)
            chain = self._chain_rows(db, capability_id, lock=True)
            # Sent before the time is read: on a pipelined store both come back in one round trip.
            in_use = self._count_leases(db, chain.values())
            now = self._now(db)
            grant = self._grant(db, entity, capability_id, now, "use", loaded=chain)
            lease = "lease_" + secrets.token_urlsafe(16)
            self._take_slot(db, lease, grant, now, in_use)
            return lease

    def renew_slot(self, entity: str, capability_id: str, lease: str) -> None:
        """Extend a lease. One that was reaped meanwhile (its holder stalled past its expiry) is taken again
        if the budget still has room; otherwise ConcurrencyLimitError says the slot is lost."""
        with self.store.write() as db:
            now = self._now(db)
            renewed = db.execute("UPDATE leases SET expires_at = ? WHERE id = ?", (now + LEASE_SECONDS, lease))
            if renewed.rowcount == 0:
                self._sweep_expired_leases(db)
                chain = self._chain_rows(db, capability_id, lock=True)
                in_use = self._count_leases(db, chain.values())
                now = self._now(db)
                grant = self._grant(db, entity, capability_id, now, "use", loaded=chain)
                self._take_slot(db, lease, grant, now, in_use)

    def release_slot(self, lease: str, record: Mapping[str, Any] | None = None) -> None:
        """Free a slot; with ``record`` (the arguments of :meth:`record`), audit the generation in the same
        write transaction: one commit (one fsync) instead of two on every request's way out."""
        with self.store.write() as db:
            db.execute("DELETE FROM leases WHERE id = ?", (lease,))
            if record is not None:
                self._audit(db, **record)

    # --- internals -----------------------------------------------------------------------------------------------

    def _chain_rows(self, db: Db, capability_id: object, *, lock: bool = False) -> dict[str, Capability]:
        """The capability and its ancestors, read in one statement (and on a shared store held until the
        transaction ends, root first, with ``lock``): what :meth:`_grant` checks, without a query per link."""
        if not isinstance(capability_id, str) or not _is_utf8(capability_id):
            return {}  # no such capability: the check that follows refuses it
        rows = self.store.capability_chain(db, capability_id, MAX_CHAIN_LENGTH, lock=lock)
        return {row["id"]: Capability.from_row(row) for row in rows}

    def _clock(self, db: Db) -> tuple[str, tuple[float, ...]]:
        """The time as an SQL operand and its parameters: the store's clock read inside the statement where the
        store has one in SQL (no round trip of its own), else the time as a parameter."""
        if self.clock is None and self.store.clock_sql is not None:
            return self.store.clock_sql, ()
        return "?", (self._now(db),)

    def _sweep_expired_leases(self, db: Db) -> None:
        clock, parameters = self._clock(db)
        db.execute(f"DELETE FROM leases WHERE expires_at <= {clock}", parameters)  # noqa: S608 - no user input

    @staticmethod
    def _count_leases(db: Db, chain: Iterable[Capability]) -> Cursor | None:
        """The slots in use against each budget of the chain (``capability_id``, ``in_use`` rows), or None if
        no link has a budget. Expired leases are swept already."""
        limited = [link.id for link in chain if link.type == GENERATE and link.params.get("max_concurrent") is not None]
        if not limited:
            return None
        placeholders = ", ".join("?" for _ in limited)
        return db.execute(
            f"SELECT capability_id, COUNT(*) AS in_use FROM lease_budgets WHERE capability_id IN ({placeholders})"  # noqa: S608 - placeholders only
            " GROUP BY capability_id", limited)

    def _take_slot(self, db: Db, lease: str, grant: Grant, now: float, in_use: Cursor | None) -> None:
        """Check the slots in use (:meth:`_count_leases` of the same chain) against every budget, and take one."""
        counts = {row["capability_id"]: int(row["in_use"]) for row in in_use} if in_use is not None else {}
        budgets = [link for link in grant.chain if link.type == GENERATE]
        for link in budgets:
            limit = link.params.get("max_concurrent")
            if limit is not None and counts.get(link.id, 0) >= limit:
                raise ConcurrencyLimitError(
                    f"capability {link.id!r} allows {limit} concurrent generation(s) across itself and its "
                    f"delegates, and {counts.get(link.id, 0)} are running; retry when one finishes"
                )
        db.execute("INSERT INTO leases (id, capability_id, holder, acquired_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                   (lease, grant.capability.id, f"{socket.gethostname()}:{os.getpid()}", now, now + LEASE_SECONDS))
        db.executemany("INSERT INTO lease_budgets (lease_id, capability_id) VALUES (?, ?)",
                       [(lease, link.id) for link in budgets])

    @contextlib.contextmanager
    def _recording_denials(self, entity: str, capability_id: str, action: str) -> Iterator[None]:
        """Record a refusal in the audit log after its transaction has rolled back (so nothing else changed)."""
        try:
            yield
        except (DeniedError, InvalidParamsError) as error:
            self.record(entity, capability_id if isinstance(capability_id, str) else None, action, "denied",
                        detail=str(error))
            raise

    def _insert(self, db: Db, capability_type: str, owner: str, params: dict[str, Any], *,
                parent_id: str | None, expires_at: float | None, now: float) -> Capability:
        identifier = new_capability_id()
        db.execute(
            "INSERT INTO capabilities (id, type, owner, params, parent_id, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (identifier, capability_type, owner, json.dumps(params, sort_keys=True), parent_id, now, expires_at),
        )
        return self._load(db, identifier)

    def _find(self, db: Db, capability_id: object, loaded: Mapping[str, Capability] | None = None) -> Capability | None:
        # No stored id holds a lone surrogate (ids are URL-safe base64), and SQLite would refuse to bind one.
        if not isinstance(capability_id, str) or not _is_utf8(capability_id):
            return None
        if loaded is not None and capability_id in loaded:
            return loaded[capability_id]
        row = db.execute("SELECT * FROM capabilities WHERE id = ?", (capability_id,)).fetchone()
        return Capability.from_row(row) if row else None

    def _load(self, db: Db, capability_id: str) -> Capability:
        capability = self._find(db, capability_id)
        assert capability is not None
        return capability

    def _held(self, db: Db, entity: str, capability_id: str, verb: str,
              loaded: Mapping[str, Capability] | None = None) -> Capability:
        capability = self._find(db, capability_id, loaded)
        # One message for "no such id" and "someone else's": ids are not to be probed for.
        if capability is None or capability.owner != entity:
            raise UnknownCapabilityError(f"cannot {verb} capability {describe_value(capability_id)}: it is not held by "
                              f"{describe_value(entity)}")
        return capability

    def _chain(self, db: Db, capability: Capability,
               loaded: Mapping[str, Capability] | None = None) -> list[Capability]:
        chain = [capability]
        while chain[-1].parent_id is not None:
            if len(chain) >= MAX_CHAIN_LENGTH:
                raise DeniedError(f"capability {capability.id!r} has a delegation chain longer than "
                                  f"{MAX_CHAIN_LENGTH}")
            parent = self._find(db, chain[-1].parent_id, loaded)
            if parent is None:
                raise DeniedError(f"capability {chain[-1].id!r} has lost its parent {chain[-1].parent_id!r}")
            chain.append(parent)
        return chain

    def _check_usable(self, capability: Capability, now: float) -> None:
        if capability.revoked_at is not None:
            raise DeniedError(f"capability {capability.id!r} is revoked")
        if capability.expires_at is not None and capability.expires_at <= now:
            raise DeniedError(f"capability {capability.id!r} expired at {_when(capability.expires_at)}")

    def _grant(self, db: Db, entity: str, capability_id: str, now: float, verb: str, *,
               loaded: Mapping[str, Capability] | None = None) -> Grant:
        """``loaded``: the chain as :meth:`_chain_rows` read it (links missing from it are read one by one)."""
        capability = self._held(db, entity, capability_id, verb, loaded)
        if capability.type != GENERATE:
            raise DeniedError(f"capability {capability_id!r} is a {capability.type}, not {GENERATE}")
        chain = self._chain(db, capability, loaded)
        for link in chain:
            if link.revoked_at is not None:
                which = "is revoked" if link is capability else f"is below revoked capability {link.id!r}"
                raise DeniedError(f"capability {capability_id!r} {which}")
            if link.expires_at is not None and link.expires_at <= now:
                which = "" if link is capability else f" (through its ancestor {link.id!r})"
                raise DeniedError(f"capability {capability_id!r} expired at {_when(link.expires_at)}{which}")
        authority = chain[-1]
        if authority.type != MINT or not namespace_covers(authority.params.get("namespace", ""), GENERATE):
            raise DeniedError(f"capability {capability_id!r} does not descend from a {MINT} authority over "
                              f"{GENERATE}")
        try:
            generates = [GenerateParams.parse(link.params) for link in chain[:-1]]
            for child, parent in itertools.pairwise(generates):
                child.check_within(parent)
        except InvalidParamsError as error:
            raise DeniedError(f"capability {capability_id!r} is wider than its chain allows: {error}") from None
        if any(link.type != GENERATE for link in chain[:-1]):
            raise DeniedError(f"capability {capability_id!r} has a chain of mixed types")
        return Grant(capability=capability, params=generates[0], chain=tuple(chain))

    def _audit(self, db: Db, entity: str, capability_id: str | None, action: str, outcome: str,
               *, model: str | None = None, width: int | None = None, height: int | None = None,
               steps: int | None = None, detail: str | None = None, at: float | None = None) -> None:
        clock, clock_parameters = self._clock(db) if at is None else ("?", (at,))
        columns = "at, entity, capability_id, action, outcome, model, width, height, steps, detail"
        db.execute(
            f"INSERT INTO audit ({columns}) VALUES ({clock}, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - no user input
            (*clock_parameters, _storable(entity), _storable(capability_id if isinstance(capability_id, str) else None),
             action, outcome, _storable(model), width, height, steps, _storable(detail)),
        )


# The casts give PostgreSQL a type for parameters that may be NULL; SQLite takes them as they are.
_AUDIT_QUERY = """
    WITH RECURSIVE readable(id) AS (
        SELECT id FROM capabilities WHERE owner = :reader
        UNION SELECT c.id FROM capabilities c JOIN readable r ON c.parent_id = r.id),
    scope(id) AS (
        SELECT CAST(:capability_id AS TEXT) WHERE CAST(:capability_id AS TEXT) IS NOT NULL
        UNION ALL SELECT id FROM readable WHERE CAST(:capability_id AS TEXT) IS NULL)
    SELECT * FROM (
        SELECT a.* FROM audit a
        WHERE a.capability_id IN (SELECT id FROM scope)
          AND (CAST(:entity AS TEXT) IS NULL OR a.entity = :entity)
          AND (CAST(:action AS TEXT) IS NULL OR a.action = :action)
          AND (CAST(:outcome AS TEXT) IS NULL OR a.outcome = :outcome)
          AND (CAST(:since AS DOUBLE PRECISION) IS NULL OR a.at >= :since)
          AND (CAST(:until AS DOUBLE PRECISION) IS NULL OR a.at < :until)
        ORDER BY a.id DESC LIMIT :limit) AS newest
    ORDER BY id
"""
"""Capabilities.audit_entries: the newest ``limit`` matching entries, returned oldest first."""


_NO_LIMIT = 2**62
"""LIMIT for "all": SQLite's -1 means that, PostgreSQL refuses a negative one (and a NULL needs a type)."""


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from undecodable command-line bytes
        return False
    return True


def _storable(text: str | None) -> str | None:
    """``text`` as SQLite can store it: lone surrogates, which a Python string may hold and UTF-8 cannot, escaped
    as ``\\udcXX``. For audit entries, which describe what was asked; a refusal must be recorded, not crash."""
    if text is None or _is_utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))

