"""Bearer tokens of the HTTP service: issued by admins only, kept as digests, refused once revoked or expired,
audited; and the back-off on failed authentications."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from capability.capabilities import Capabilities
from capability.errors import DeniedError, InvalidParamsError, UnauthenticatedError
from capability.sqlite_store import MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from capability.store import STORE_FILE
from capability.tokens import MAX_TOKEN_LIFETIME_S, Tokens

try:  # the service's back-off lives with the service, whose extra needs Python 3.11
    from capability.service.auth import FREE_FAILURES, Authenticator, FailedAttempts, TooManyFailuresError
except ImportError:  # pragma: no cover - the torch-free Python 3.10 run has no [service] extra
    Authenticator = None  # type: ignore[assignment,misc]

needs_service = pytest.mark.skipif(Authenticator is None, reason="the [service] extra (Python 3.11+) is not installed")


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / STORE_FILE)
    Capabilities(store).create_authority("ops")
    return store


def all_rows(store: SQLiteStore) -> str:
    db = store.read()
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return json.dumps({table: [dict(row) for row in db.execute(f"SELECT * FROM {table}")] for table in tables})


def test_a_token_opens_for_its_entity_and_only_its_digest_is_kept(store: SQLiteStore) -> None:
    tokens = Tokens(store)
    issued = tokens.issue("ops", "alice", 3600)
    assert issued.token.startswith(f"tok_{issued.described.id}_")
    assert tokens.authenticate(issued.token) == "alice"
    assert issued.token not in all_rows(store)
    assert issued.token.split("_", 2)[2] not in all_rows(store)
    entry = Capabilities(store).audit_entries("ops", action="token-issue")[-1]
    assert entry["detail"].startswith(f"token {issued.described.id} for alice, expires ")
    assert issued.token not in json.dumps(entry)


@pytest.mark.parametrize(("presented", "message"), [
    ("tok_0123456789abcdef_" + "A" * 43, "the bearer token is unknown"),
    ("not-a-token", "the bearer token is malformed"),
    ("tok_0123456789abcdef_short", "the bearer token is malformed"),
    ("", "the bearer token is malformed"),
])
def test_a_wrong_token_is_refused_without_echoing_it(store: SQLiteStore, presented: str, message: str) -> None:
    with pytest.raises(UnauthenticatedError, match=message) as refused:
        Tokens(store).authenticate(presented)
    assert presented not in str(refused.value) or not presented


def test_a_right_id_with_a_wrong_secret_is_unknown(store: SQLiteStore) -> None:
    issued = Tokens(store).issue("ops", "alice", 3600)
    forged = issued.token[:-1] + ("B" if issued.token[-1] != "B" else "C")
    with pytest.raises(UnauthenticatedError, match="unknown"):
        Tokens(store).authenticate(forged)


def test_revoked_and_expired_tokens_are_refused_by_name(store: SQLiteStore) -> None:
    tokens = Tokens(store)
    revoked, expired = tokens.issue("ops", "alice", 3600), tokens.issue("ops", "bob", 3600)
    described = tokens.revoke("ops", revoked.described.id)
    assert described.revoked_at is not None
    with pytest.raises(UnauthenticatedError, match=f"token {revoked.described.id} is revoked"):
        tokens.authenticate(revoked.token)
    with store.write() as db:  # its time has come, as far as the store's clock is concerned
        db.execute("UPDATE tokens SET expires_at = created_at - 1 WHERE id = ?", (expired.described.id,))
    with pytest.raises(UnauthenticatedError, match=f"token {expired.described.id} expired at "):
        tokens.authenticate(expired.token)
    assert [entry["action"] for entry in Capabilities(store).audit_entries("ops")][-3:] == [
        "token-issue", "token-issue", "token-revoke"]


def test_only_an_admin_issues_lists_and_revokes(store: SQLiteStore) -> None:
    tokens = Tokens(store)
    issued = tokens.issue("ops", "alice", 3600)
    for attempt in (lambda: tokens.issue("alice", "alice", 3600), lambda: tokens.list("alice"),
                    lambda: tokens.revoke("alice", issued.described.id)):
        with pytest.raises(DeniedError, match=r"'alice' may not .* only the owner of a sys\.mint authority"):
            attempt()
    assert tokens.authenticate(issued.token) == "alice"
    assert [token.entity for token in tokens.list("ops")] == ["alice"]


@pytest.mark.parametrize("expires_in", [0, -5, MAX_TOKEN_LIFETIME_S + 1, float("nan"), float("inf"), True])
def test_a_lifetime_out_of_bounds_is_refused(store: SQLiteStore, expires_in: float) -> None:
    with pytest.raises(InvalidParamsError, match=r"expires_in=.* is invalid"):
        Tokens(store).issue("ops", "alice", expires_in)


def test_a_whole_token_revokes_by_its_id_and_nothing_echoes_a_secret(store: SQLiteStore) -> None:
    tokens = Tokens(store)
    leaked, kept = tokens.issue("ops", "alice", 3600), tokens.issue("ops", "alice", 3600)
    secret = leaked.token.split("_", 2)[2]
    assert tokens.revoke("ops", leaked.token).id == leaked.described.id  # the leaked token itself will do
    with pytest.raises(UnauthenticatedError, match="is revoked"):
        tokens.authenticate(leaked.token)
    for wrong, message in ((leaked.token[:-3], "is not a token id"), ("0123456789abcdef", "no token has the id")):
        with pytest.raises(InvalidParamsError, match=message) as refused:
            tokens.revoke("ops", wrong)
        assert secret[:8] not in str(refused.value)
    assert tokens.authenticate(kept.token) == "alice"


def test_a_store_of_the_previous_schema_gains_the_tokens_table_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILE
    with sqlite3.connect(path) as connection:
        for migration in MIGRATIONS[:SCHEMA_VERSION - 1]:
            connection.executescript(migration)
        connection.execute("INSERT INTO audit (at, entity, action, outcome) VALUES (1, 'ops', 'mint', 'ok')")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    path.chmod(0o600)
    store = SQLiteStore(path)
    assert store.read().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.read().execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 1
    Capabilities(store).create_authority("ops")
    assert Tokens(store).authenticate(Tokens(store).issue("ops", "alice", 60).token) == "alice"


def cli(state_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capability", *arguments, "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_cli_issues_once_lists_without_secrets_and_revokes(tmp_path: Path) -> None:
    assert cli(tmp_path, "init", "--admin", "ops").returncode == 0
    issued = cli(tmp_path, "token", "issue", "--as", "ops", "--entity", "alice", "--expires-in", "30d")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.splitlines()[0]
    identifier = token.split("_")[1]
    assert f"token {identifier} for alice, expires " in issued.stdout
    listed = cli(tmp_path, "token", "list", "--as", "ops", "--json")
    assert [entry["id"] for entry in json.loads(listed.stdout)] == [identifier]
    assert token.split("_", 2)[2] not in listed.stdout
    revoked = cli(tmp_path, "token", "revoke", "--as", "ops", "--token", identifier)
    assert revoked.stdout.strip() == f"revoked token {identifier} of alice"
    store = SQLiteStore(tmp_path / STORE_FILE)
    with pytest.raises(UnauthenticatedError, match="is revoked"):
        Tokens(store).authenticate(token)
    refused = cli(tmp_path, "token", "issue", "--as", "alice", "--entity", "alice")
    assert refused.returncode == 1
    assert refused.stderr.startswith("refused: 'alice' may not issue tokens")
    bad = cli(tmp_path, "token", "issue", "--as", "ops", "--entity", "bob", "--expires-in", "soon")
    assert bad.returncode == 2
    assert "'soon' is invalid: must be a duration like 3600 (seconds), 90s, 15m, 12h, 30d or 1w" in bad.stderr


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@needs_service
def test_failed_authentications_earn_a_doubling_wait_and_a_success_clears_it() -> None:
    clock = FakeClock()
    failures = FailedAttempts(clock)
    for _ in range(FREE_FAILURES):
        failures.check("10.0.0.1")
        failures.failed("10.0.0.1")
    failures.check("10.0.0.1")  # the free ones cost nothing
    failures.failed("10.0.0.1")
    with pytest.raises(TooManyFailuresError) as blocked:
        failures.check("10.0.0.1")
    assert blocked.value.retry_after_s == pytest.approx(1.0)
    failures.check("10.0.0.2")  # another address is not held up
    clock.now += 1.0
    failures.failed("10.0.0.1")
    with pytest.raises(TooManyFailuresError) as doubled:
        failures.check("10.0.0.1")
    assert doubled.value.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0
    failures.succeeded("10.0.0.1")
    failures.failed("10.0.0.1")
    failures.check("10.0.0.1")


@needs_service
def test_behind_listed_proxies_failures_count_against_the_client_not_the_proxy(store: SQLiteStore) -> None:
    authenticator = Authenticator(Tokens(store), forwarded_from=("10.0.0.0/8",))
    assert authenticator.client_address("10.1.2.3", "203.0.113.7, 10.0.0.9") == "203.0.113.7"
    assert authenticator.client_address("192.0.2.1", "203.0.113.7") == "192.0.2.1"  # not a listed proxy
    assert authenticator.client_address("10.1.2.3", None) == "10.1.2.3"


@needs_service
def test_a_trusted_header_is_believed_only_from_the_listed_proxies(store: SQLiteStore) -> None:
    authenticator = Authenticator(Tokens(store), trusted_header="X-User", trusted_proxies=("127.0.0.1",))
    assert authenticator.authenticate("127.0.0.1", None, "alice") == "alice"
    with pytest.raises(UnauthenticatedError, match="believed only from the configured authenticating proxies"):
        authenticator.authenticate("192.0.2.1", None, "alice")
    with pytest.raises(InvalidParamsError, match="--trusted-header X-User needs --trusted-proxy"):
        Authenticator(Tokens(store), trusted_header="X-User")
