"""Moving a capability store to another (``python -m capability store migrate --from URL --to URL``): typically
the SQLite file of one host into the PostgreSQL database that many hosts will share.

Capabilities, the audit log, the registered servers and the service's bearer tokens (their digests) are copied,
with their ids (audit entries keep their order); live concurrency leases are not: a lease belongs to a
generation running now, and the source should be idle.
The copy is one transaction on the target, checked before it commits: the same number of rows of each kind and
the same content digest as the source. A target that already holds rows is refused unless ``force`` (which
replaces them) or unless it already holds exactly the source's content, so running the same migration twice is
safe: the second run finds it done.

A store that keeps no secrets (PostgreSQL) cannot take a SQLite store's registered server keys as they are: each
is written into a file of ``key_dir`` (mode 0600) and the server registered with that file's path, which every
host must then be able to read (mount the directory, or a Secret holding the files, at the same path).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import StoreError
from .store import Db, Store

CAPABILITY_COLUMNS = ("id", "type", "owner", "params", "parent_id", "created_at", "expires_at", "revoked_at")
AUDIT_COLUMNS = ("id", "at", "entity", "capability_id", "action", "outcome", "model", "width", "height", "steps",
                 "detail")
TOKEN_COLUMNS = ("id", "digest", "entity", "issued_by", "created_at", "expires_at", "revoked_at")
TABLES = ("capabilities", "audit", "servers", "tokens")


@dataclass(frozen=True)
class Migration:
    """What a migration found and did."""

    counts: dict[str, int]
    """Rows per table, in the source and (as verified) in the target."""
    digest: str
    """SHA-256 of the copied content (servers without their keys), the same on both sides."""
    copied: bool
    """False when the target already held exactly this content: nothing to do."""

    def as_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "digest": self.digest, "copied": self.copied}


def migrate(source: Store, target: Store, *, force: bool = False, key_dir: Path | None = None) -> Migration:
    if _same_store(source, target):
        raise StoreError(f"--from and --to are the same store ({source.url}): nothing to migrate")
    source_db = source.read()
    capabilities = _ordered_capabilities(_rows(source_db, "capabilities", CAPABILITY_COLUMNS, "id"))
    audit = _rows(source_db, "audit", AUDIT_COLUMNS, "id")
    servers = _servers(source, source_db)
    tokens = _rows(source_db, "tokens", TOKEN_COLUMNS, "id")
    counts = {"capabilities": len(capabilities), "audit": len(audit), "servers": len(servers), "tokens": len(tokens)}
    digest = content_digest(capabilities, audit, _without_keys(servers), tokens)

    with target.write() as db:
        held = {table: _count(db, table) for table in TABLES}
        if any(held.values()):
            if content_digest(*_content(target, db)) == digest:
                return Migration(counts=counts, digest=digest, copied=False)
            if not force:
                raise StoreError(
                    f"the target store {target.url} is not empty ({_described(held)}) and holds other content than "
                    f"{source.url}: nothing was copied; migrate into an empty store, or give --force to replace "
                    "what it holds")
            for table in ("lease_budgets", "leases", "audit", "servers", "tokens", "capabilities"):
                db.execute(f"DELETE FROM {table}")  # noqa: S608 - our own table names
        _insert_all(db, target.dialect, "capabilities", CAPABILITY_COLUMNS, capabilities)
        _insert_all(db, target.dialect, "audit", AUDIT_COLUMNS, audit, keep_identity=True)
        _copy_servers(target, db, servers, key_dir)
        _insert_all(db, target.dialect, "tokens", TOKEN_COLUMNS, tokens)
        if target.dialect == "postgresql":
            # The identity column continues after the copied ids (PostgreSQL does not move it on explicit ids).
            db.execute("SELECT setval(pg_get_serial_sequence('audit', 'id'), COALESCE(MAX(id), 0) + 1, false) "
                       "AS next FROM audit")
        copied_counts = {table: _count(db, table) for table in TABLES}
        copied_digest = content_digest(*_content(target, db))
        if copied_counts != counts or copied_digest != digest:  # raising here rolls the whole copy back
            raise StoreError(f"the copy into {target.url} does not match {source.url} (rows {copied_counts} against "
                             f"{counts}): nothing was written; is something writing to the source?")
    return Migration(counts=counts, digest=digest, copied=True)


def content_digest(capabilities: list[dict[str, Any]], audit: list[dict[str, Any]],
                   servers: list[dict[str, Any]], tokens: list[dict[str, Any]]) -> str:
    """SHA-256 over the rows in a canonical form (sorted by id; floats by repr: both stores keep IEEE doubles)."""
    hasher = hashlib.sha256()
    for name, rows, key in (("capabilities", capabilities, "id"), ("audit", audit, "id"), ("servers", servers, "url"),
                            ("tokens", tokens, "id")):
        hasher.update(name.encode())
        for row in sorted(rows, key=lambda row: row[key]):
            hasher.update(json.dumps(row, sort_keys=True, default=repr).encode())
    return hasher.hexdigest()


def _content(store: Store, db: Db) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                                             list[dict[str, Any]]]:
    return (_rows(db, "capabilities", CAPABILITY_COLUMNS, "id"), _rows(db, "audit", AUDIT_COLUMNS, "id"),
            _without_keys(_servers(store, db)), _rows(db, "tokens", TOKEN_COLUMNS, "id"))


def _without_keys(servers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What must match on both sides: a key may move into a key file, and registration times are the source's."""
    return [{"url": server["url"], "grpc_address": server["grpc_address"]} for server in servers]


def _rows(db: Db, table: str, columns: tuple[str, ...], order: str) -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}"  # noqa: S608 - our own names
    return [{column: row[column] for column in columns} for row in db.execute(sql)]


def _servers(store: Store, db: Db) -> list[dict[str, Any]]:
    secret = "infer_key" if store.stores_secrets else "infer_key_file"
    return [{"url": row["url"], "grpc_address": row["grpc_address"], "registered_at": row["registered_at"],
             secret: row[secret]}
            for row in db.execute("SELECT * FROM servers ORDER BY url")]


def _ordered_capabilities(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parents before children, so that every row's parent exists when it is inserted."""
    by_id = {row["id"]: row for row in rows}
    ordered: list[dict[str, Any]] = []
    placed: set[str] = set()

    def place(row: dict[str, Any], depth: int = 0) -> None:
        if row["id"] in placed or depth > len(rows):
            return
        parent = by_id.get(row["parent_id"]) if row["parent_id"] else None
        if parent is not None:
            place(parent, depth + 1)
        placed.add(row["id"])
        ordered.append(row)

    for row in rows:
        place(row)
    return ordered


def _insert_all(db: Db, dialect: str, table: str, columns: tuple[str, ...], rows: list[dict[str, Any]], *,
                keep_identity: bool = False) -> None:
    if not rows:
        return
    placeholders = ", ".join(f":{column}" for column in columns)
    # PostgreSQL generates audit ids itself unless told to take these; SQLite takes them as they come.
    overriding = " OVERRIDING SYSTEM VALUE" if keep_identity and dialect == "postgresql" else ""
    db.executemany(f"INSERT INTO {table} ({', '.join(columns)}){overriding} VALUES ({placeholders})", rows)  # noqa: S608


def _copy_servers(target: Store, db: Db, servers: list[dict[str, Any]], key_dir: Path | None) -> None:
    for server in servers:
        row = {"url": server["url"], "registered_at": server["registered_at"], "grpc_address": server["grpc_address"]}
        if target.stores_secrets:
            row["secret"] = server["infer_key"] if "infer_key" in server else _read(Path(server["infer_key_file"]))
            column = "infer_key"
        else:
            column = "infer_key_file"
            if "infer_key_file" in server:
                row["secret"] = server["infer_key_file"]
            else:
                if key_dir is None:
                    raise StoreError(
                        f"{target.url} keeps no server keys, only the path of a key file on every host, and the "
                        f"source registers {len(servers)} server(s) with their keys: give --key-dir DIR, and the "
                        "keys are written there (one file each, mode 0600) for every host to mount at that path")
                row["secret"] = str(_write_key(key_dir, server["url"], server["infer_key"]))
        db.execute(f"INSERT INTO servers (url, {column}, registered_at, grpc_address) "  # noqa: S608
                   "VALUES (:url, :secret, :registered_at, :grpc_address)", row)


def _write_key(directory: Path, url: str, key: str) -> Path:
    directory = directory.resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    parts = urlsplit(url)
    path = directory / f"{parts.hostname}_{parts.port}.key"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise StoreError(f"the key file {path} of a registered server cannot be read here: {error}") from None


def _count(db: Db, table: str) -> int:
    return int(db.execute(f"SELECT COUNT(*) AS n FROM {table}").fetchone()["n"])  # noqa: S608 - our own names


def _described(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {table}" for table, count in counts.items() if count)


def _same_store(first: Store, second: Store) -> bool:
    return first.url == second.url
