"""Capabilities against real stores, SQLite and PostgreSQL: every attack refused with a clear error and nothing
changed. The store's own file rules are tested on SQLite alone."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capability.capabilities import Capabilities, GenerateParams, canonical_server_url
from capability.errors import ConcurrencyLimitError, DeniedError, InvalidParamsError, StoreError, UnknownServerError
from capability.sqlite_store import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from capability.store import STORE_FILE, Store

SERVER = "http://127.0.0.1:8000"
OTHER_SERVER = "http://127.0.0.1:9000"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(any_store: Store) -> Store:
    return any_store


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / STORE_FILE)
    yield store
    store.close()


@pytest.fixture
def caps(store: Store, clock: Clock) -> Capabilities:
    return Capabilities(store, clock=clock)


@pytest.fixture
def authority(caps: Capabilities) -> str:
    return caps.create_authority("admin").id


def minted(caps: Capabilities, authority: str, **params: Any) -> str:
    params.setdefault("server_url", SERVER)
    params.setdefault("default_model", "tiny-sd15")
    return caps.mint("admin", authority, params).id


def snapshot(store: Store) -> list[tuple[Any, ...]]:
    columns = ("id", "owner", "params", "parent_id", "expires_at", "revoked_at")
    rows = store.read().execute(f"SELECT {', '.join(columns)} FROM capabilities ORDER BY id")
    return [tuple(row[column] for column in columns) for row in rows]


def test_mint_stores_canonical_params_when_given_the_seed_example(caps: Capabilities, authority: str) -> None:
    capability = caps.show("admin", minted(caps, authority, server_url="HTTP://LocalHost:8000/",
                                           allowed_models=["tiny-sd15", "tiny-sdxl"]))
    assert capability.params == {"server_url": "http://localhost:8000", "default_model": "tiny-sd15",
                                 "allowed_models": ["tiny-sd15", "tiny-sdxl"]}
    assert capability.id.startswith("cap_")
    assert len(capability.id) >= 4 + 32  # 192 random bits, base64url


def test_authorize_grants_the_owner_when_the_chain_is_intact(caps: Capabilities, authority: str) -> None:
    grant = caps.authorize("admin", minted(caps, authority))
    assert grant.params.default_model == "tiny-sd15"
    assert [link.type for link in grant.chain] == ["diffusers.generate", "sys.mint"]


@pytest.mark.parametrize(
    ("restrictions", "message"),
    [
        ({"allowed_models": ["tiny-sd15", "tiny-flux"]}, r"allowed_models \['tiny-flux'\] are not in the parent's"),
        ({"max_width": 1024}, "max_width=1024 is wider than the parent's 512"),
        ({"max_steps": 50}, "max_steps=50 is wider than the parent's 8"),
        ({"max_concurrent": 3}, "max_concurrent=3 is wider than the parent's 2"),
        ({"server_url": OTHER_SERVER}, "server_url .* differs from the parent's"),
        ({"default_model": "tiny-flux"}, r"default_model 'tiny-flux' is not in allowed_models"),
        ({"colour": "red"}, r"unknown parameter\(s\) \['colour'\]"),
        ({"max_height": 0}, "max_height=0 is invalid: must be a positive integer"),
    ],
)
def test_delegate_refuses_and_changes_nothing_when_the_child_would_be_wider(
    caps: Capabilities, store: Store, authority: str, restrictions: dict[str, Any], message: str
) -> None:
    parent = minted(caps, authority, allowed_models=["tiny-sd15", "tiny-sdxl"], max_width=512, max_steps=8,
                    max_concurrent=2)
    before = snapshot(store)
    with pytest.raises(InvalidParamsError, match=message):
        caps.delegate("admin", parent, restrictions)
    assert snapshot(store) == before
    assert caps.audit_log("admin", parent)[-1]["outcome"] == "denied"


def test_delegate_refuses_a_list_of_every_model_when_the_parent_has_an_allowlist(
    caps: Capabilities, authority: str
) -> None:
    parent = minted(caps, authority, allowed_models=["tiny-sd15"])
    with pytest.raises(InvalidParamsError, match="must be a subset"):
        GenerateParams.parse({"server_url": SERVER, "default_model": "tiny-sd15"}).check_within(
            caps.authorize("admin", parent).params)


def test_delegate_inherits_limits_and_expiry_when_restrictions_are_silent(
    caps: Capabilities, authority: str, clock: Clock
) -> None:
    parent = minted(caps, authority, max_width=512, expires_at=clock.now + 60)
    child = caps.show("admin", caps.delegate("admin", parent, {"max_steps": 4}).id)
    assert child.params["max_width"] == 512
    assert child.params["max_steps"] == 4
    assert child.expires_at == clock.now + 60


def test_delegate_refuses_a_later_expiry_when_the_parent_expires_sooner(
    caps: Capabilities, authority: str, clock: Clock
) -> None:
    parent = minted(caps, authority, expires_at=clock.now + 60)
    with pytest.raises(InvalidParamsError, match="is later than the parent's"):
        caps.delegate("admin", parent, {"expires_at": clock.now + 120})


def test_mint_refuses_a_default_model_outside_the_allowlist(caps: Capabilities, authority: str) -> None:
    with pytest.raises(InvalidParamsError, match=r"default_model 'tiny-flux' is not in allowed_models"):
        minted(caps, authority, default_model="tiny-flux", allowed_models=["tiny-sd15"])


def test_mint_refuses_when_the_authority_namespace_only_shares_a_prefix(caps: Capabilities) -> None:
    prefix_only = caps.create_authority("admin", namespace="diffuser").id
    with pytest.raises(DeniedError, match=r"namespace 'diffuser', which does not cover 'diffusers.generate'"):
        minted(caps, prefix_only)
    covering = caps.create_authority("admin", namespace="diffusers.generate").id
    assert caps.authorize("admin", minted(caps, covering))


@pytest.mark.parametrize("verb", ["use", "delegate", "give", "show"])
def test_non_owner_is_refused_with_the_same_message_as_for_a_made_up_id(
    caps: Capabilities, store: Store, authority: str, verb: str
) -> None:
    real = minted(caps, authority)
    before = snapshot(store)
    messages = []
    for capability_id in (real, "cap_made_up_0000000000000000000000000000"):
        with pytest.raises(DeniedError) as caught:
            _act(caps, verb, "mallory", capability_id)
        messages.append(str(caught.value).replace(capability_id, "<id>"))
    assert messages[0] == messages[1]
    assert "is not held by 'mallory'" in messages[0]
    assert snapshot(store) == before


def _act(caps: Capabilities, verb: str, entity: str, capability_id: str) -> object:
    if verb == "use":
        return caps.authorize(entity, capability_id)
    if verb == "delegate":
        return caps.delegate(entity, capability_id, {})
    if verb == "give":
        return caps.give(entity, capability_id, entity)
    return caps.show(entity, capability_id)


def test_giver_loses_use_delegation_and_giving_when_a_capability_is_given(caps: Capabilities, authority: str) -> None:
    capability = minted(caps, authority)
    caps.give("admin", capability, "bob")
    assert caps.authorize("bob", capability).capability.owner == "bob"
    for verb in ("use", "delegate", "give"):
        with pytest.raises(DeniedError, match="not held by 'admin'"):
            _act(caps, verb, "admin", capability)


def test_revoke_disables_descendants_when_an_ancestor_owner_revokes(caps: Capabilities, authority: str) -> None:
    parent = minted(caps, authority)
    child = caps.delegate("admin", parent, {"max_steps": 4}).id
    caps.give("admin", child, "bob")
    grandchild = caps.delegate("bob", child, {"max_steps": 2}).id
    with pytest.raises(DeniedError, match="neither held by 'mallory'"):
        caps.revoke("mallory", child)
    assert set(caps.revoke("admin", child)) == {child, grandchild}
    with pytest.raises(DeniedError, match="is revoked"):
        caps.authorize("bob", child)
    with pytest.raises(DeniedError, match="is revoked"):
        caps.authorize("bob", grandchild)
    assert caps.authorize("admin", parent)


def test_revoking_the_authority_disables_everything_it_minted(caps: Capabilities, authority: str) -> None:
    capability = minted(caps, authority)
    caps.revoke("admin", authority)
    with pytest.raises(DeniedError, match="is revoked"):
        caps.authorize("admin", capability)


def test_a_revoked_ancestor_disables_a_capability_whose_own_row_was_edited_back(
    caps: Capabilities, store: Store, authority: str
) -> None:
    capability = minted(caps, authority)
    caps.revoke("admin", authority)
    with store.write() as db:
        db.execute("UPDATE capabilities SET revoked_at = NULL WHERE id = ?", (capability,))
    with pytest.raises(DeniedError, match="is below revoked capability"):
        caps.authorize("admin", capability)


def test_use_is_refused_when_the_capability_or_an_ancestor_has_expired(
    caps: Capabilities, authority: str, clock: Clock
) -> None:
    parent = minted(caps, authority, expires_at=clock.now + 60)
    child = caps.delegate("admin", parent, {}).id
    clock.now += 61
    with pytest.raises(DeniedError, match="expired at"):
        caps.authorize("admin", child)


def test_an_edited_row_cannot_widen_a_capability_when_its_chain_is_rechecked(
    caps: Capabilities, store: Store, authority: str
) -> None:
    parent = minted(caps, authority, allowed_models=["tiny-sd15"], max_width=256)
    child = caps.delegate("admin", parent, {}).id
    widened = json.dumps({"server_url": SERVER, "default_model": "tiny-sd15", "max_width": 4096})
    with store.write() as db:
        db.execute("UPDATE capabilities SET params = ? WHERE id = ?", (widened, child))
    with pytest.raises(DeniedError, match="wider than its chain allows"):
        caps.authorize("admin", child)


def test_concurrency_budget_is_shared_by_a_capability_and_its_delegates(caps: Capabilities, authority: str) -> None:
    parent = minted(caps, authority, max_concurrent=2)
    children = [caps.delegate("admin", parent, {"max_concurrent": 2}).id for _ in range(2)]
    leases = [caps.acquire_slot("admin", child) for child in children]
    with pytest.raises(ConcurrencyLimitError, match=f"{parent}.*allows 2 concurrent"):
        caps.acquire_slot("admin", parent)
    caps.release_slot(leases[0])
    assert caps.acquire_slot("admin", parent)


def test_a_dead_holders_slot_is_freed_when_its_lease_expires(
    caps: Capabilities, authority: str, clock: Clock
) -> None:
    capability = minted(caps, authority, max_concurrent=1)
    caps.acquire_slot("admin", capability)  # never released: its holder "died"
    with pytest.raises(ConcurrencyLimitError):
        caps.acquire_slot("admin", capability)
    clock.now += 31
    assert caps.acquire_slot("admin", capability)


def test_every_use_and_denial_is_recorded_when_they_happen(caps: Capabilities, authority: str) -> None:
    capability = minted(caps, authority)
    caps.authorize("admin", capability)
    with pytest.raises(DeniedError):
        caps.authorize("mallory", capability)
    caps.record("admin", capability, "generate", "ok", model="tiny-sd15", width=64, height=64, steps=2)
    log = caps.audit_log("admin", capability)
    assert [(entry["entity"], entry["action"], entry["outcome"]) for entry in log] == [
        ("admin", "mint", "ok"), ("mallory", "generate", "denied"), ("admin", "generate", "ok")]


@pytest.mark.parametrize(
    ("url", "canonical"),
    [("http://127.0.0.1:8000", "http://127.0.0.1:8000"), ("HTTP://Example.COM", "http://example.com:80"),
     ("https://example.com/", "https://example.com:443"), ("http://[::1]:8000", "http://[::1]:8000")],
)
def test_canonical_server_url_binds_keys_to_one_form_when_written_differently(url: str, canonical: str) -> None:
    assert canonical_server_url(url) == canonical


@pytest.mark.parametrize("url", ["ftp://host", "127.0.0.1:8000", "http://host:8000/v2", "http://u:p@host:1"])
def test_canonical_server_url_refuses_anything_but_scheme_host_and_port(url: str) -> None:
    with pytest.raises(InvalidParamsError, match="server_url"):
        canonical_server_url(url)


def test_store_is_private_and_versioned_when_created(sqlite_store: SQLiteStore) -> None:
    assert sqlite_store.path.stat().st_mode & 0o777 == 0o600
    assert sqlite_store.read().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert sqlite_store.read().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    path.touch()
    path.chmod(0o644)
    with pytest.raises(StoreError, match=r"\(mode 644\) must belong to this user and be readable by it alone"):
        SQLiteStore(path)


def test_store_refuses_a_newer_schema_when_opened_by_older_code(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    SQLiteStore(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version=99")
    with pytest.raises(Exception, match=f"schema version 99, newer than this code's {SCHEMA_VERSION}"):
        SQLiteStore(path)


def test_store_refuses_a_directory_others_can_write_to(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(Exception, match="writable by it alone"):
        SQLiteStore(shared / STORE_FILE)


def test_store_refuses_a_journal_planted_with_open_permissions(tmp_path: Path) -> None:
    planted = tmp_path / (STORE_FILE + "-wal")
    planted.touch()
    planted.chmod(0o666)
    with pytest.raises(Exception, match="readable by it alone"):
        SQLiteStore(tmp_path / STORE_FILE)


def test_store_refuses_a_symbolic_link_in_place_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").touch()
    (tmp_path / STORE_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="cannot open the capability store"):
        SQLiteStore(tmp_path / STORE_FILE)


def test_slot_is_refused_when_the_capability_was_revoked_after_it_was_authorized(
    caps: Capabilities, authority: str
) -> None:
    capability = minted(caps, authority)
    caps.authorize("admin", capability)
    caps.revoke("admin", capability)
    with pytest.raises(DeniedError, match="is revoked"):
        caps.acquire_slot("admin", capability)


def test_renewing_a_reaped_lease_takes_the_slot_again_or_says_it_is_lost(
    caps: Capabilities, authority: str, clock: Clock
) -> None:
    capability = minted(caps, authority, max_concurrent=1)
    stalled = caps.acquire_slot("admin", capability)
    clock.now += 31
    caps.renew_slot("admin", capability, stalled)  # reaped by nobody yet: taken again
    clock.now += 31
    other = caps.acquire_slot("admin", capability)  # reaps the stalled lease
    with pytest.raises(ConcurrencyLimitError):
        caps.renew_slot("admin", capability, stalled)
    caps.release_slot(other)


def test_give_is_refused_while_the_giver_keeps_a_delegated_copy(caps: Capabilities, store: Store,
                                                                 authority: str) -> None:
    capability = minted(caps, authority)
    kept = caps.delegate("admin", capability, {}).id
    before = snapshot(store)
    with pytest.raises(DeniedError, match=f"while 'admin' holds capabilities delegated from it \\({kept}\\)"):
        caps.give("admin", capability, "bob")
    assert snapshot(store) == before
    caps.give("admin", kept, "carol")
    assert caps.give("admin", capability, "bob").owner == "bob"


def test_refused_mint_parameters_are_audited_against_the_authority(caps: Capabilities, authority: str) -> None:
    with pytest.raises(InvalidParamsError):
        caps.mint("admin", authority, {"server_url": SERVER})
    assert caps.audit_log("admin", authority)[-1]["action"] == "mint"
    assert caps.audit_log("admin", authority)[-1]["outcome"] == "denied"


@pytest.mark.parametrize("url", ["http://host:0", "http://a b:8000", "http://[::1]x:80", "http://%41:80",
                                 "http://[127.0.0.1]:80", "http://-bad-.example:80"])
def test_canonical_server_url_refuses_malformed_hosts_and_ports(url: str) -> None:
    with pytest.raises(InvalidParamsError, match="server_url"):
        canonical_server_url(url)


def test_release_slot_audits_the_generation_in_the_same_transaction_when_given_a_record(
    caps: Capabilities, authority: str
) -> None:
    capability = minted(caps, authority, max_concurrent=1)
    lease = caps.acquire_slot("admin", capability)
    caps.release_slot(lease, {"entity": "admin", "capability_id": capability, "action": "generate",
                              "outcome": "ok", "model": "sd15", "width": 64, "height": 64, "steps": 2})
    assert caps.acquire_slot("admin", capability)  # the slot is free again
    last = caps.audit_log("admin", capability)[-1]
    assert (last["action"], last["outcome"], last["model"], last["width"], last["steps"]) == (
        "generate", "ok", "sd15", 64, 2)


def test_lease_renewer_extends_only_the_leases_it_holds_when_it_renews(
    caps: Capabilities, authority: str, clock: Clock
) -> None:
    from capability.generation import LeaseRenewer

    capability = minted(caps, authority, max_concurrent=2)
    held, dropped = caps.acquire_slot("admin", capability), caps.acquire_slot("admin", capability)
    renewer = LeaseRenewer(caps)
    renewer.add(held, "admin", capability)
    renewer.add(dropped, "admin", capability)
    renewer.discard(dropped)
    clock.now += 20
    renewer.renew_all()
    clock.now += 20  # 40 s after both were taken: only the renewed one is still alive
    assert caps.acquire_slot("admin", capability)
    with pytest.raises(ConcurrencyLimitError):
        caps.acquire_slot("admin", capability)
    renewer.close()


def test_lease_renewer_runs_again_when_a_lease_is_added_after_close(caps: Capabilities, authority: str) -> None:
    from capability.generation import LeaseRenewer

    capability = minted(caps, authority, max_concurrent=2)
    renewer = LeaseRenewer(caps)
    renewer.add(caps.acquire_slot("admin", capability), "admin", capability)
    renewer.close()
    renewer.add(caps.acquire_slot("admin", capability), "admin", capability)
    assert renewer._thread is not None
    assert renewer._thread.is_alive()
    assert not renewer._stop.is_set()
    renewer.close()


def key_file(directory: Path, key: str) -> Path:
    path = directory / f"key-{key}"
    path.write_text(key + "\n")
    return path


def test_registered_keys_stay_out_of_a_shared_store_which_keeps_only_where_each_host_reads_them(
    store: Store, tmp_path: Path,
) -> None:
    from capability.servers import ServerKeys

    keys = ServerKeys(store, None)
    path = key_file(tmp_path, "the-key-of-the-gpu-server-0001")
    keys.register("http://gpu:8000", path, grpc_address="gpu:8001")
    assert keys.key_for("http://gpu:8000") == "the-key-of-the-gpu-server-0001"
    [row] = store.read().execute("SELECT * FROM servers").fetchall()
    columns = dict(row)
    if store.stores_secrets:  # SQLite: one host's private file
        assert columns["infer_key"] == "the-key-of-the-gpu-server-0001"
    else:  # PostgreSQL: every host reads it, so it holds where the key is, never the key
        assert "the-key-of-the-gpu-server-0001" not in {str(value) for value in columns.values()}
        assert columns["infer_key_file"] == str(path.resolve())
        path.write_text("a-rotated-key-of-the-gpu-server-02\n")  # a rolling restart with a new Secret: read when needed
        assert keys.key_for("http://gpu:8000") == "a-rotated-key-of-the-gpu-server-02"
        path.unlink()
        with pytest.raises(UnknownServerError, match=r"cannot be read: No such file.*every host that uses this server"):
            keys.key_for("http://gpu:8000")


def test_a_version_1_store_is_migrated_keeping_its_rows_and_registered_servers_gain_a_grpc_address(
    tmp_path: Path,
) -> None:
    from capability.servers import ServerKeys

    path = tmp_path / STORE_FILE
    with sqlite3.connect(path) as connection:  # the store as the first release wrote it
        connection.executescript(MIGRATIONS[0])
        connection.execute("INSERT INTO servers (url, infer_key, registered_at) VALUES ('http://gpu:8000', 'k', 1)")
        connection.execute("PRAGMA user_version = 1")
    connection.close()
    path.chmod(0o600)
    store = SQLiteStore(path)
    assert store.read().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    keys = ServerKeys(store, None)
    assert keys.key_for("http://gpu:8000") == "k"
    with pytest.raises(UnknownServerError, match="--grpc-address HOST:PORT"):
        keys.grpc_address("http://gpu:8000")
    keys.register("http://gpu:8000", key_file(tmp_path, "k2-" + "x" * 24), grpc_address="GPU:8001")
    assert keys.grpc_address("http://gpu:8000") == "gpu:8001"
    with pytest.raises(InvalidParamsError, match="grpc_address='gpu' is invalid: must be HOST:PORT"):
        keys.register("http://gpu:8000", key_file(tmp_path, "k2-" + "x" * 24), grpc_address="gpu")
    # The key goes to that address too: it must be on the server's own host.
    with pytest.raises(InvalidParamsError, match="its host is not 'gpu', the host of http://gpu:8000"):
        keys.register("http://gpu:8000", key_file(tmp_path, "k2-" + "x" * 24), grpc_address="elsewhere:8001")
    with pytest.raises(InvalidParamsError, match=r"\[::1\]:8001 for IPv6"):
        keys.register("http://[::1]:8000", key_file(tmp_path, "k2-" + "x" * 24), grpc_address="::1:8001")
    keys.register("http://[::1]:8000", key_file(tmp_path, "k2-" + "x" * 24), grpc_address="[::1]:8001")
    assert keys.grpc_address("http://[::1]:8000") == "[::1]:8001"
    # A new key alone keeps the registered address.
    keys.register("http://gpu:8000", key_file(tmp_path, "k3-" + "x" * 24))
    assert keys.grpc_address("http://gpu:8000") == "gpu:8001"
    keys.register("https://tls:8443", key_file(tmp_path, "k-" + "x" * 24), grpc_address="tls:8001")
    with pytest.raises(UnknownServerError, match="plain gRPC, which would carry the key unencrypted"):
        keys.grpc_address("https://tls:8443")
    store.close()
