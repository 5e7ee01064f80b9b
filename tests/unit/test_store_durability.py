"""The store under abuse: writers killed with SIGKILL, many writers at once, damaged, foreign, locked and
unwritable files, a full disk, and random sequences of mint/delegate/give/revoke. Each case ends with a clear
StoreError (or success), the file's committed contents intact, and no capability wider than its parent.

Real SQLite files in tmp_path and real processes; no torch, no server.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import multiprocessing
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from capability.capabilities import GENERATE, Capabilities
from capability.errors import CapabilityError, DeniedError, InvalidParamsError, StoreError
from capability.sqlite_store import SQLiteStore
from capability.store import STORE_FILE, Store, open_store
from tests.conftest import STORE_KINDS
from workbench.postgres import PostgresServer

SPAWN = multiprocessing.get_context("spawn")
SERVER = "http://127.0.0.1:8000"
OTHER_SERVER = "http://127.0.0.1:9000"
SHORT_BUSY_TIMEOUT_MS = 200
"""Long enough for SQLite's busy handler to retry, short enough that a refused write does not slow the suite."""
PROCESS_TIMEOUT_S = 120
"""Upper bound on waiting for a child process: only reached if the test is broken, never as synchronisation."""


def _generate_params(**params: Any) -> dict[str, Any]:
    return {"server_url": SERVER, "default_model": "tiny-sd15", **params}


def opened(url: str) -> Store:
    """The store at ``url`` (a test's SQLite file or PostgreSQL database: ``store_url``)."""
    return open_store(url, Path("/nonexistent"))


def _rows(store: Store, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
    return store.read().execute(sql, parameters).fetchall()


def _capability_rows(store: SQLiteStore) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in _rows(store, "SELECT * FROM capabilities ORDER BY id")]


# --- the schema's invariants ---------------------------------------------------------------------------------


def assert_store_is_consistent(store: Store) -> None:
    """Everything that one write transaction makes together is there together, or not at all."""
    if isinstance(store, SQLiteStore):  # PostgreSQL checks its pages and foreign keys on every write
        assert [tuple(row) for row in _rows(store, "PRAGMA integrity_check")] == [("ok",)]
        assert _rows(store, "PRAGMA foreign_key_check") == []
    capabilities = {row["id"]: row for row in _rows(store, "SELECT * FROM capabilities")}
    created = {}
    for row in _rows(store, "SELECT capability_id, action FROM audit WHERE action IN ('mint', 'delegate') "
                            "AND outcome = 'ok'"):
        assert row["capability_id"] not in created, f"{row['capability_id']} audited as created twice"
        created[row["capability_id"]] = row["action"]
    for identifier, row in capabilities.items():
        if row["type"] != GENERATE:
            continue
        # A capability and the audit record of its creation are one transaction.
        parent = capabilities[row["parent_id"]]
        assert created.get(identifier) == ("mint" if parent["type"] != GENERATE else "delegate")
        # Revocation covers a whole subtree in one transaction.
        if parent["revoked_at"] is not None:
            assert row["revoked_at"] is not None, f"{identifier} is live under revoked {parent['id']}"
    assert set(created) <= set(capabilities), "an audit record names a capability that was never committed"
    for row in _rows(store, "SELECT * FROM leases"):
        chain, link = [], capabilities[row["capability_id"]]
        while link["type"] == GENERATE:
            chain.append(link["id"])
            link = capabilities[link["parent_id"]]
        budgets = _rows(store, "SELECT capability_id FROM lease_budgets WHERE lease_id = ?", (row["id"],))
        assert sorted(budget["capability_id"] for budget in budgets) == sorted(chain)
    # A change of owner and its audit record are one transaction: the last give names the owner.
    last_give = {row["capability_id"]: row["detail"] for row in _rows(
        store, "SELECT capability_id, detail FROM audit WHERE action = 'give' AND outcome = 'ok' ORDER BY id")}
    for identifier, detail in last_give.items():
        assert detail == f"to {capabilities[identifier]['owner']}"


def assert_store_takes_writes(store: Store) -> None:
    capabilities = Capabilities(store)
    authority = capabilities.create_authority("admin").id
    minted = capabilities.mint("admin", authority, _generate_params(max_concurrent=1)).id
    child = capabilities.delegate("admin", minted, {"max_width": 256}).id
    capabilities.release_slot(capabilities.acquire_slot("admin", child))
    assert capabilities.revoke("admin", minted) == [minted, child]
    assert_store_is_consistent(store)


# --- 1. kill -9 during writes ----------------------------------------------------------------------------------

MAX_ROUNDS = 10_000
"""Bound on the writer's loop; the parent kills it after a few dozen commits."""


def _write_until_killed(url: str, authority: str, reports: Connection) -> None:
    """Mint, delegate, give, lease and revoke in a loop; report each operation once its commit has returned."""
    capabilities = Capabilities(opened(url))
    for round_number in range(MAX_ROUNDS):
        minted = capabilities.mint("admin", authority, _generate_params(max_concurrent=MAX_ROUNDS)).id
        reports.send(("mint", minted, authority))
        child = capabilities.delegate("admin", minted, {"max_width": 512}).id
        reports.send(("delegate", child, minted))
        capabilities.give("admin", child, "bob")
        reports.send(("give", child, "bob"))
        lease = capabilities.acquire_slot("bob", child)
        reports.send(("lease", lease, child))
        if round_number % 2:
            reports.send(("revoke", minted, capabilities.revoke("admin", minted)))


@pytest.mark.parametrize("commits_before_kill", [1, 5, 18, 47])
def test_sigkill_during_writes_keeps_every_reported_commit_and_nothing_half_written(
        store_url: str, commits_before_kill: int) -> None:
    store = opened(store_url)
    authority = Capabilities(store).create_authority("admin").id
    reader, writer = SPAWN.Pipe(duplex=False)
    process = SPAWN.Process(target=_write_until_killed, args=(store_url, authority, writer))
    process.start()
    writer.close()  # the child's copy stays open: recv() ends with EOFError once the child is gone
    reports = []
    for _ in range(commits_before_kill):
        assert reader.poll(PROCESS_TIMEOUT_S), "the writer reported nothing"
        reports.append(reader.recv())
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)  # wherever it is: mid-transaction, mid-commit or between two
    process.join(PROCESS_TIMEOUT_S)
    assert process.exitcode == -signal.SIGKILL
    while True:  # reports sent after the K-th (each send is one atomic pipe write) are commits too
        try:
            reports.append(reader.recv())
        except (EOFError, OSError):
            break
    store.close()

    reopened = opened(store_url)
    assert_store_is_consistent(reopened)
    capabilities = {row["id"]: row for row in _rows(reopened, "SELECT * FROM capabilities")}
    for action, subject, detail in reports:
        if action in {"mint", "delegate"}:
            assert capabilities[subject]["parent_id"] == detail
        elif action == "give":
            assert capabilities[subject]["owner"] == detail
        elif action == "lease":
            assert [row["capability_id"] for row in _rows(reopened, "SELECT * FROM leases WHERE id = ?",
                                                           (subject,))] == [detail]
        else:
            assert all(capabilities[revoked]["revoked_at"] is not None for revoked in detail)
    assert len(reports) >= commits_before_kill
    assert_store_takes_writes(reopened)
    reopened.close()


# --- 2. many concurrent writers ---------------------------------------------------------------------------------

WRITERS = 6
ROUNDS_PER_WRITER = 15


def _write_alongside_others(url: str, authority: str, worker: int, start: Any, results: Any) -> None:
    """One writer's share: each round commits a mint, a delegation, a give, a delegation by the recipient, an
    audit record and a revocation of the subtree, interleaved with the other writers' transactions."""
    capabilities = Capabilities(opened(url))
    holder = f"worker-{worker}"
    created: list[str] = []
    errors: list[str] = []
    start.wait()
    for _ in range(ROUNDS_PER_WRITER):
        try:
            minted = capabilities.mint("admin", authority, _generate_params(max_steps=50)).id
            child = capabilities.delegate("admin", minted, {"max_steps": 20}).id
            capabilities.give("admin", child, holder)
            grandchild = capabilities.delegate(holder, child, {"max_steps": 10}).id
            capabilities.record(holder, grandchild, "generate", "ok", model="tiny-sd15", steps=10)
            revoked = capabilities.revoke("admin", child)
            assert revoked == [child, grandchild]
            created += [minted, child, grandchild]
        except CapabilityError as error:  # reported, never swallowed: the test fails on any
            errors.append(f"{type(error).__name__}: {error}")
    results.put((worker, created, errors))


def test_concurrent_writers_lose_nothing_when_six_processes_mint_delegate_give_and_revoke(store_url: str) -> None:
    store = opened(store_url)
    authority = Capabilities(store).create_authority("admin").id
    start = SPAWN.Barrier(WRITERS)
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=_write_alongside_others, args=(store_url, authority, worker, start, results))
                 for worker in range(WRITERS)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=PROCESS_TIMEOUT_S) for _ in processes)
    for process in processes:
        process.join(PROCESS_TIMEOUT_S)

    # The store's busy timeout outlasts every transaction here, so no writer may be refused, even as "busy".
    assert [errors for _, _, errors in outcomes] == [[]] * WRITERS
    assert [process.exitcode for process in processes] == [0] * WRITERS
    created = {identifier for _, identifiers, _ in outcomes for identifier in identifiers}
    rounds = WRITERS * ROUNDS_PER_WRITER
    assert len(created) == 3 * rounds
    rows = {row["id"]: row for row in _rows(store, "SELECT * FROM capabilities WHERE type = ?", (GENERATE,))}
    assert set(rows) == created
    assert sum(row["revoked_at"] is not None for row in rows.values()) == 2 * rounds
    audit = {row["action"]: row["n"] for row in _rows(
        store, "SELECT action, COUNT(*) AS n FROM audit WHERE outcome = 'ok' GROUP BY action")}
    assert audit == {"mint": rounds, "delegate": 2 * rounds, "give": rounds, "generate": rounds, "revoke": rounds}
    for worker, identifiers, _ in outcomes:
        for minted, child, grandchild in zip(identifiers[::3], identifiers[1::3], identifiers[2::3], strict=True):
            assert (rows[child]["parent_id"], rows[child]["owner"]) == (minted, f"worker-{worker}")
            assert (rows[grandchild]["parent_id"], rows[grandchild]["owner"]) == (child, f"worker-{worker}")
    assert_store_is_consistent(store)
    store.close()


# --- 3. damaged and foreign files --------------------------------------------------------------------------------


def _filled_store(path: Path, count: int = 150) -> list[str]:
    """A closed store holding ``count`` capabilities (closing checkpoints the WAL into the file)."""
    store = SQLiteStore(path)
    capabilities = Capabilities(store)
    authority = capabilities.create_authority("admin").id
    minted = [capabilities.mint("admin", authority, _generate_params(default_model="m" * 200)).id
              for _ in range(count)]
    store.close()
    return minted


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(6).randbytes(16 * 1024))


def _truncated_store(path: Path) -> None:
    _filled_store(path)
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


def _foreign_database(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (body TEXT)")
        connection.execute("INSERT INTO notes VALUES ('not a capability')")
    connection.close()


def _foreign_database_with_our_table_names(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE capabilities (anything)")
    connection.close()


def _store_claiming_a_version_without_its_tables(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE capabilities (anything)")
        connection.execute("PRAGMA user_version = 1")
    connection.close()


@pytest.mark.parametrize(("damage", "problem", "advice"), [
    (_random_bytes, "is not an SQLite database", "restore it from a backup"),
    (_truncated_store, "is damaged", "restore it from a backup"),
    (_foreign_database, "is an SQLite database but not a capability store", "point --state-dir at the right"),
    (_foreign_database_with_our_table_names, "not a capability store .*capabilities", "move the file aside"),
    (_store_claiming_a_version_without_its_tables, "lacks the tables audit, lease_budgets, leases, servers",
     "restore it from a backup"),
])
def test_opening_a_damaged_or_foreign_file_is_refused_clearly_and_leaves_its_bytes_alone(
        tmp_path: Path, damage: Any, problem: str, advice: str) -> None:
    path = tmp_path / STORE_FILE
    damage(path)
    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=problem) as refused:
        SQLiteStore(path)
    assert str(path) in str(refused.value)
    assert advice in str(refused.value)
    assert "left" in str(refused.value)  # it says the file was left as it was
    assert path.read_bytes() == before
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [STORE_FILE]


def test_a_damaged_page_found_while_using_the_store_is_a_store_error_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    minted = _filled_store(path)
    with sqlite3.connect(path) as connection:
        root_page = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'capabilities'").fetchone()[0]
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    with path.open("r+b") as file:  # the capabilities table's root page, overwritten with garbage
        file.seek((root_page - 1) * page_size)
        file.write(random.Random(6).randbytes(page_size))
    before = path.read_bytes()

    store = SQLiteStore(path)  # the header and the schema are intact: the damage shows only when the table is read
    capabilities = Capabilities(store)
    for use in (lambda: capabilities.show("admin", minted[0]), lambda: capabilities.owned("admin"),
                lambda: capabilities.mint("admin", minted[0], _generate_params()),
                lambda: capabilities.revoke("admin", minted[0])):
        with pytest.raises(StoreError, match=rf"capability store {path} is damaged .*restore it from a backup"):
            use()
    store.close()
    assert path.read_bytes() == before


# --- 4. a locked database ----------------------------------------------------------------------------------------

HOLD_THE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "whole-file":  # readers are kept out too, as by a tool that opened the file exclusively
    connection.execute("PRAGMA locking_mode=EXCLUSIVE")
connection.execute("BEGIN EXCLUSIVE")
connection.execute("INSERT INTO audit (at, entity, action, outcome) VALUES (0, 'holder', 'hold', 'ok')")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("COMMIT")
connection.close()
"""


@contextlib.contextmanager
def _lock_held_by_another_process(path: Path, scope: str) -> Iterator[None]:
    """Another process holds an open write transaction (``scope`` "writes") or the whole file ("whole-file")
    until the block ends; it then commits its own row."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(path), scope], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.stdin.write("release\n")
        holder.stdin.close()
        holder.stdout.close()
        assert holder.wait(PROCESS_TIMEOUT_S) == 0


def test_writes_against_a_lock_held_past_the_busy_timeout_fail_clearly_and_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    store = SQLiteStore(path, busy_timeout_ms=SHORT_BUSY_TIMEOUT_MS)
    capabilities = Capabilities(store)
    authority = capabilities.create_authority("admin").id
    minted = capabilities.mint("admin", authority, _generate_params()).id
    before = _capability_rows(store)

    with _lock_held_by_another_process(path, "writes"):
        for write in (lambda: capabilities.mint("admin", authority, _generate_params()),
                      lambda: capabilities.delegate("admin", minted, {}),
                      lambda: capabilities.revoke("admin", minted),
                      lambda: capabilities.acquire_slot("admin", minted),
                      lambda: SQLiteStore(path, busy_timeout_ms=SHORT_BUSY_TIMEOUT_MS)):
            with pytest.raises(StoreError, match=rf"capability store {path} is locked by another process "
                                                 r"\(database is locked, still after 0.2 s\): nothing was written"):
                write()
        # WAL: readers are not held up by a writer.
        assert capabilities.show("admin", minted).owner == "admin"

    assert _capability_rows(store) == before
    assert capabilities.delegate("admin", minted, {}).parent_id == minted
    assert [row["entity"] for row in _rows(store, "SELECT entity FROM audit WHERE action = 'hold'")] == ["holder"]
    assert_store_is_consistent(store)
    store.close()


def test_reads_against_a_file_held_exclusively_fail_clearly_and_work_once_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    store = SQLiteStore(path, busy_timeout_ms=SHORT_BUSY_TIMEOUT_MS)
    capabilities = Capabilities(store)
    minted = capabilities.mint("admin", capabilities.create_authority("admin").id, _generate_params()).id
    store.close()  # the holder cannot take the whole file while another connection has it open

    with _lock_held_by_another_process(path, "whole-file"):
        for read in (lambda: capabilities.show("admin", minted), lambda: capabilities.owned("admin")):
            with pytest.raises(StoreError, match=rf"capability store {path} is locked by another process"):
                read()

    assert capabilities.show("admin", minted).owner == "admin"
    assert_store_is_consistent(store)
    store.close()


# --- 5. unwritable state dir and database file ----------------------------------------------------------------------

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_root_file_access() -> str | None:
    """Make file modes bind this process even as root (tests run as root in CI, and root ignores modes).

    Clears CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this thread's effective set, which any process may do.
    Returns why it could not, or None.
    """
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # version, pid 0 (this thread)
    sets = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for capabilities 0-31, then 32-63
    if libc.capget(header, sets) != 0:
        return f"capget failed: {os.strerror(ctypes.get_errno())}"
    sets[0] &= ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    if libc.capset(header, sets) != 0:
        return f"capset failed: {os.strerror(ctypes.get_errno())}"
    return None


def _open_without_root_file_access(path: Path, results: Any) -> None:
    problem = _drop_root_file_access()
    if problem is not None:
        results.put(("skip", problem))
        return
    try:
        store = SQLiteStore(path)
        Capabilities(store).owned("admin")
    except StoreError as error:
        results.put(("refused", str(error)))
    else:
        results.put(("opened", ""))


def _open_in_a_process_bound_by_file_modes(path: Path) -> str:
    """The StoreError a process gets that file modes bind (root included); skip if none can be made."""
    results = SPAWN.Queue()
    process = SPAWN.Process(target=_open_without_root_file_access, args=(path, results))
    process.start()
    outcome, message = results.get(timeout=PROCESS_TIMEOUT_S)
    process.join(PROCESS_TIMEOUT_S)
    if outcome == "skip":
        pytest.skip(f"cannot make file modes bind root here: {message}")
    assert outcome == "refused", "a store that this process cannot write was opened"
    return str(message)


def test_a_read_only_store_file_is_refused_clearly_and_kept(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    minted = _filled_store(path, count=3)
    path.chmod(0o400)
    before = path.read_bytes()
    message = _open_in_a_process_bound_by_file_modes(path)
    assert message.startswith(f"cannot open the capability store {path} for reading and writing "
                              "(Permission denied): it must be a regular file this user can read and write")
    assert path.read_bytes() == before
    path.chmod(0o600)
    assert [capability.id for capability in Capabilities(SQLiteStore(path)).owned("admin")][1:] == minted


def test_a_state_dir_that_cannot_take_new_files_is_refused_clearly_and_its_store_kept(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    path = state_dir / STORE_FILE
    minted = _filled_store(path, count=3)
    state_dir.chmod(0o500)  # SQLite cannot create the -wal and -shm files beside the store
    before = path.read_bytes()
    try:
        message = _open_in_a_process_bound_by_file_modes(path)
    finally:
        state_dir.chmod(0o700)
    assert message.startswith(f"capability store {path} is read-only")
    assert f"this user must be able to write the file and create files in {state_dir}" in message
    assert path.read_bytes() == before
    assert [capability.id for capability in Capabilities(SQLiteStore(path)).owned("admin")][1:] == minted


def test_a_state_dir_below_a_regular_file_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    state_dir = tmp_path / "not-a-dir" / "state"
    with pytest.raises(StoreError, match=rf"cannot create the state dir {state_dir} for the capability store "
                                         r"\(Not a directory\): it must be a directory this user can create"):
        SQLiteStore(state_dir / STORE_FILE)
    assert (tmp_path / "not-a-dir").read_text() == ""


def test_a_state_dir_that_is_a_regular_file_is_refused_clearly(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.write_text("keep me")
    with pytest.raises(StoreError, match=rf"state dir {state_dir} is not a directory"):
        SQLiteStore(state_dir / STORE_FILE)
    assert state_dir.read_text() == "keep me"


# --- 6. never wider than granted ---------------------------------------------------------------------------------

ENTITIES = ("admin", "alice", "bob")
MODELS = ("m1", "m2", "m3")
LIMITS = ("max_concurrent", "max_width", "max_height", "max_steps")
NOW = 1_800_000_000.0
EXPIRIES = (NOW + 100, NOW + 200, NOW + 300)

ALLOWLISTS = st.none() | st.lists(st.sampled_from(MODELS), min_size=1, max_size=3, unique=True)
LIMIT_VALUES = st.none() | st.integers(min_value=1, max_value=4)
MINT_PARAMS = st.fixed_dictionaries(
    {"server_url": st.just(SERVER), "default_model": st.sampled_from(MODELS), "allowed_models": ALLOWLISTS,
     **dict.fromkeys(LIMITS, LIMIT_VALUES)},
    optional={"expires_at": st.sampled_from(EXPIRIES)},
)
# Restrictions that may narrow, keep or widen (another server, more models, None for "no limit", a later expiry).
# Few at a time, so that a single widening among narrowings is common.
RESTRICTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "server_url": st.sampled_from([SERVER, OTHER_SERVER]), "default_model": st.sampled_from(MODELS),
    "allowed_models": ALLOWLISTS, "expires_at": st.sampled_from(EXPIRIES), **dict.fromkeys(LIMITS, LIMIT_VALUES),
}
RESTRICTIONS = st.lists(st.one_of([value.map(functools.partial(lambda name, chosen: {name: chosen}, name))
                                   for name, value in RESTRICTION_VALUES.items()]), max_size=3).map(
    lambda restrictions: {name: value for restriction in restrictions for name, value in restriction.items()})
TARGETS = st.integers(min_value=0, max_value=99)  # an index into the capabilities made so far, modulo their number
# "owner" stands for whoever holds the target when the operation runs: most operations come from the holder.
ACTORS = st.sampled_from(("owner", "owner", *ENTITIES))
OPERATION_KINDS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "mint": st.tuples(st.just("mint"), st.sampled_from(("admin", "admin", "bob")), MINT_PARAMS),  # mostly its owner
    "delegate": st.tuples(st.just("delegate"), ACTORS, TARGETS, RESTRICTIONS),
    "give": st.tuples(st.just("give"), ACTORS, TARGETS, st.sampled_from(ENTITIES)),
    # -1 stands for the authority: one revocation in a hundred ends everything (integers() would favour -1).
    "revoke": st.tuples(st.just("revoke"), ACTORS, st.sampled_from(range(-1, 100))),
}
# Most operations are delegations: the operation that could widen a capability.
OPERATIONS = st.lists(
    st.sampled_from(["mint", "delegate", "delegate", "delegate", "delegate", "give", "revoke"]).flatmap(
        OPERATION_KINDS.__getitem__),
    min_size=4, max_size=20)


@dataclass
class Expected:
    """What the rules say an operation must do: its refusal (and the fields a widening one breaks), or what it
    stores. Worked out from the rows, independently of capabilities.py."""

    refusal: type[CapabilityError] | None = None
    widened: set[str] = field(default_factory=set)
    params: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    owner: str | None = None


def _rows_by_id(store: Store) -> dict[str, dict[str, Any]]:
    return {row["id"]: {**dict(row), "params": json.loads(row["params"])}
            for row in _rows(store, "SELECT * FROM capabilities")}


def _chain(rows: Mapping[str, dict[str, Any]], identifier: str) -> list[dict[str, Any]]:
    chain = [rows[identifier]]
    while chain[-1]["parent_id"] is not None:
        chain.append(rows[chain[-1]["parent_id"]])
    return chain


def _descendants(rows: Mapping[str, dict[str, Any]], identifier: str) -> list[dict[str, Any]]:
    children = [row for row in rows.values() if row["parent_id"] == identifier]
    return children + [below for child in children for below in _descendants(rows, child["id"])]


def _widened_fields(parent: Mapping[str, Any], child: Mapping[str, Any]) -> set[str]:
    """The fields in which ``child`` grants more than ``parent`` (absent means every model, or no limit)."""
    widened = set()
    if child.get("server_url") != parent.get("server_url"):
        widened.add("server_url")
    allowed, parent_allowed = child.get("allowed_models"), parent.get("allowed_models")
    if parent_allowed is not None and (allowed is None or not set(allowed) <= set(parent_allowed)):
        widened.add("allowed_models")
    if allowed is not None and child.get("default_model") not in allowed:
        widened.add("default_model")
    for name in LIMITS:
        if parent.get(name) is not None and (child.get(name) is None or child[name] > parent[name]):
            widened.add(name)
    return widened


def _expected_delegation(rows: Mapping[str, dict[str, Any]], entity: str, parent_id: str,
                         restrictions: Mapping[str, Any]) -> Expected:
    chain = _chain(rows, parent_id)
    if chain[0]["owner"] != entity or any(link["revoked_at"] is not None for link in chain):
        return Expected(refusal=DeniedError)
    parent = chain[0]["params"]
    child = dict(parent)
    narrower_list = restrictions.get("allowed_models")
    if narrower_list and "default_model" not in restrictions and parent["default_model"] not in narrower_list:
        child["default_model"] = narrower_list[0]  # the documented choice when the parent's default is cut out
    child.update({name: value for name, value in restrictions.items() if name != "expires_at"})
    widened = _widened_fields(parent, child)
    chain_expiry = min((link["expires_at"] for link in chain if link["expires_at"] is not None), default=None)
    expires_at = restrictions.get("expires_at")
    if expires_at is not None and chain_expiry is not None and expires_at > chain_expiry:
        widened.add("expires_at")
    if widened:
        return Expected(refusal=InvalidParamsError, widened=widened)
    return Expected(params={name: value for name, value in child.items() if value is not None},
                    expires_at=expires_at or chain_expiry, owner=entity)


def assert_never_wider_than_granted(rows: Mapping[str, dict[str, Any]]) -> None:
    for row in rows.values():
        if row["type"] != GENERATE:
            continue
        parent = rows[row["parent_id"]]
        if parent["type"] == GENERATE:
            assert _widened_fields(parent["params"], row["params"]) == set(), row
            if parent["expires_at"] is not None:
                assert row["expires_at"] is not None
                assert row["expires_at"] <= parent["expires_at"]
        else:
            assert parent["params"] == {"namespace": "diffusers"}
        allowed = row["params"].get("allowed_models")
        assert allowed is None or row["params"]["default_model"] in allowed
        if parent["revoked_at"] is not None:
            assert row["revoked_at"] is not None, f"{row['id']} is live below revoked {parent['id']}"


def _outcome(operation: Any) -> tuple[Any, CapabilityError | None]:
    try:
        return operation(), None
    except CapabilityError as error:
        return None, error


def _plan(capabilities: Capabilities, authority: str, generated: list[str], rows: Mapping[str, dict[str, Any]],
          step: tuple[Any, ...]) -> tuple[Expected, Callable[[], Any], str | None]:
    """What ``step`` must do, the call that does it, and the capability it acts on (None for a mint)."""
    kind, entity = step[0], step[1]
    if kind == "mint":
        params = step[2]
        if params.get("allowed_models") is not None and params["default_model"] not in params["allowed_models"]:
            expected = Expected(refusal=InvalidParamsError, widened={"default_model"})
        elif entity != "admin" or rows[authority]["revoked_at"] is not None:
            expected = Expected(refusal=DeniedError)
        else:
            expected = Expected(params={k: v for k, v in params.items() if k != "expires_at" and v is not None},
                                expires_at=params.get("expires_at"), owner=entity)
        return expected, lambda: capabilities.mint(entity, authority, params), None
    target = authority if kind == "revoke" and step[2] < 0 else generated[step[2] % len(generated)]
    if entity == "owner":
        entity = rows[target]["owner"]
    if kind == "delegate":
        restrictions = step[3]
        return (_expected_delegation(rows, entity, target, restrictions),
                lambda: capabilities.delegate(entity, target, restrictions), target)
    if kind == "give":
        kept = [below for below in _descendants(rows, target) if below["owner"] == entity and not below["revoked_at"]]
        refused = rows[target]["owner"] != entity or rows[target]["revoked_at"] is not None or kept
        return (Expected(refusal=DeniedError) if refused else Expected(owner=step[3]),
                lambda: capabilities.give(entity, target, step[3]), target)
    owners = {link["owner"] for link in _chain(rows, target)}
    return (Expected(refusal=None if entity in owners else DeniedError),
            lambda: capabilities.revoke(entity, target), target)


def _check_one_step(capabilities: Capabilities, authority: str, generated: list[str], step: tuple[Any, ...]) -> None:
    """Carry out one operation; check its outcome against the rules and the store against the invariants."""
    if step[0] != "mint" and not generated:
        return
    rows = _rows_by_id(capabilities.store)
    expected, operation, target = _plan(capabilities, authority, generated, rows, step)
    result, error = _outcome(operation)
    event(f"{step[0]}: {type(error).__name__ if error else 'done'}")  # --hypothesis-show-statistics: the mix
    after = _rows_by_id(capabilities.store)
    assert_never_wider_than_granted(after)
    if expected.refusal is not None:
        assert isinstance(error, expected.refusal), f"{step}: expected {expected.refusal.__name__}, got {error!r}"
        if expected.widened:  # the message names a field that would have been wider
            assert any(name in str(error) for name in expected.widened), (str(error), expected.widened)
        assert after == rows, f"{step} was refused but changed the store"
        return
    assert error is None, f"{step}: refused with {error!r}"
    if step[0] in {"mint", "delegate"}:
        generated.append(result.id)
        assert (after[result.id]["params"], after[result.id]["expires_at"]) == (expected.params, expected.expires_at)
    if step[0] in {"mint", "delegate", "give"}:
        assert after[result.id]["owner"] == expected.owner
    else:
        assert target is not None
        _check_revoked(capabilities, after, target, result)


def _check_revoked(capabilities: Capabilities, rows: Mapping[str, dict[str, Any]], target: str,
                   revoked: list[str]) -> None:
    """Revocation reaches the whole subtree, and nothing in it can be used or delegated any more."""
    assert set(revoked) == {target} | {row["id"] for row in _descendants(rows, target)}
    for identifier in revoked:
        assert rows[identifier]["revoked_at"] is not None
        if rows[identifier]["type"] == GENERATE:
            with pytest.raises(DeniedError, match="revoked"):
                capabilities.authorize(rows[identifier]["owner"], identifier)
            with pytest.raises(DeniedError, match="revoked"):
                capabilities.delegate(rows[identifier]["owner"], identifier, {})


@pytest.mark.parametrize("kind", STORE_KINDS)
@settings(max_examples=50, database=None, deadline=None)
@given(st.tuples(st.just("mint"), st.just("admin"), MINT_PARAMS), OPERATIONS)
def test_no_sequence_of_operations_makes_a_capability_wider_than_its_parent(
        kind: str, postgres: PostgresServer, first: tuple[Any, ...], steps: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        store = SQLiteStore(Path(state_dir) / STORE_FILE) if kind == "sqlite" else opened(postgres.database())
        capabilities = Capabilities(store, clock=lambda: NOW)
        authority = capabilities.create_authority("admin").id
        generated: list[str] = []
        for step in [first, *steps]:  # the first mint is by the authority's owner: there is something to act on
            _check_one_step(capabilities, authority, generated, step)
        # Every capability is usable by its owner exactly when no link of its chain is revoked, with its own
        # stored parameters (the whole chain is re-checked at use).
        rows = _rows_by_id(store)
        for identifier in generated:
            live = all(link["revoked_at"] is None for link in _chain(rows, identifier))
            owner = rows[identifier]["owner"]
            grant, error = _outcome(functools.partial(capabilities.authorize, owner, identifier))
            assert (grant is not None) == live, (identifier, error)
            if grant is not None:
                assert grant.params.as_json() == rows[identifier]["params"]
        store.close()


def _mint_until_the_disk_is_full(path: Path, authority: str, results: Any) -> None:
    """Mint with a file-size limit standing in for a full disk (it binds root too); report what happened."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    capabilities = Capabilities(SQLiteStore(path))
    largest = max(path.stat().st_size, Path(f"{path}-wal").stat().st_size)
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 64 * 1024, resource.RLIM_INFINITY))
    minted: list[str] = []
    for _ in range(MAX_ROUNDS):
        try:
            minted.append(capabilities.mint("admin", authority, _generate_params(default_model="m" * 1000)).id)
        except StoreError as error:
            results.put((minted, str(error)))
            return
    results.put((minted, "the file-size limit was never reached"))


def test_a_full_disk_refuses_the_write_clearly_and_keeps_every_earlier_commit(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    store = SQLiteStore(path)
    authority = Capabilities(store).create_authority("admin").id
    results = SPAWN.Queue()
    process = SPAWN.Process(target=_mint_until_the_disk_is_full, args=(path, authority, results))
    process.start()
    minted, message = results.get(timeout=PROCESS_TIMEOUT_S)
    process.join(PROCESS_TIMEOUT_S)
    assert message.startswith(f"no space left for the capability store {path}") or message.startswith(
        f"the disk failed reading or writing the capability store {path}"), message
    assert minted, "the limit left no room for a single write"
    store.close()

    reopened = SQLiteStore(path)
    assert_store_is_consistent(reopened)
    rows = _rows(reopened, "SELECT id FROM capabilities WHERE type = ?", (GENERATE,))
    assert {row["id"] for row in rows} == set(minted)  # every reported mint, and not the refused one
    assert_store_takes_writes(reopened)
    reopened.close()
