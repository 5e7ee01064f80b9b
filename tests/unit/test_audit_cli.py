"""``python -m capability audit``: who reads which entries, and the filters, on a real SQLite store."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from capability.__main__ import main
from capability.capabilities import Capabilities
from capability.errors import DeniedError
from capability.sqlite_store import SQLiteStore
from capability.store import STORE_FILE

SERVER = "http://127.0.0.1:8000"
START = datetime(2025, 1, 31, 10, 0, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def at_minute(self, minute: int) -> None:
        self.now = START + 60 * minute


class History:
    """Who did what, at 10:MM UTC on 2025-01-31 (one audit entry per action)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        store = SQLiteStore(state_dir / STORE_FILE)
        clock = Clock()
        caps = Capabilities(store, clock=clock)
        self.authority = caps.create_authority("admin").id
        params = {"server_url": SERVER, "default_model": "tiny-sd15"}
        self.alices = caps.mint("admin", self.authority, params).id
        clock.at_minute(1)
        caps.give("admin", self.alices, "alice")
        clock.at_minute(2)
        self.bobs = caps.delegate("alice", self.alices, {"max_steps": 8}).id
        clock.at_minute(3)
        caps.give("alice", self.bobs, "bob")
        clock.at_minute(4)
        caps.record("bob", self.bobs, "generate", "ok", model="tiny-sd15", width=64, height=64, steps=4)
        clock.at_minute(5)
        with pytest.raises(DeniedError, match="not held by"):
            caps.show("mallory", self.alices)
        clock.at_minute(6)
        caps.record("bob", self.bobs, "generate", "failed", detail="boom")
        clock.at_minute(7)
        other_authority = caps.create_authority("other").id
        self.others = caps.mint("other", other_authority, params).id
        clock.at_minute(8)
        caps.record("mallory", "cap_madeup", "generate", "denied")
        store.close()

    def audit(self, capsys: pytest.CaptureFixture[str], *arguments: str) -> list[dict[str, Any]]:
        assert main(["audit", "--state-dir", str(self.state_dir), "--json", *arguments]) == 0
        entries: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
        return entries

    def summary(self, capsys: pytest.CaptureFixture[str], *arguments: str) -> list[tuple[str, str, str, str]]:
        """(minute, entity, action, outcome) of each entry, in the order printed."""
        return [(time.strftime("%H:%M", time.gmtime(entry["at"])), entry["entity"], entry["action"],
                 entry["outcome"]) for entry in self.audit(capsys, *arguments)]


@pytest.fixture
def history(tmp_path: Path) -> History:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    return History(state_dir)


ALL_UNDER_THE_AUTHORITY = [
    ("10:00", "admin", "mint", "ok"), ("10:01", "admin", "give", "ok"), ("10:02", "alice", "delegate", "ok"),
    ("10:03", "alice", "give", "ok"), ("10:04", "bob", "generate", "ok"), ("10:05", "mallory", "show", "denied"),
    ("10:06", "bob", "generate", "failed"),
]


def test_the_authoritys_owner_reads_everything_below_it_and_nothing_else(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    assert history.summary(capsys, "--as", "admin") == ALL_UNDER_THE_AUTHORITY


def test_a_holder_reads_its_capability_and_those_below_it_including_entries_from_before_it_held_them(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    assert history.summary(capsys, "--as", "alice") == ALL_UNDER_THE_AUTHORITY  # it was minted for her
    assert [(entry["action"], entry["capability_id"]) for entry in history.audit(capsys, "--as", "bob")] == [
        ("delegate", history.bobs), ("give", history.bobs), ("generate", history.bobs), ("generate", history.bobs)]
    assert history.audit(capsys, "--as", "mallory") == []
    assert [entry["capability_id"] for entry in history.audit(capsys, "--as", "other")] == [history.others]


def test_each_filter_narrows_the_entries_and_they_combine(history: History, capsys: pytest.CaptureFixture[str]) -> None:
    admin = ("--as", "admin")
    assert history.summary(capsys, *admin, "--entity", "bob") == [("10:04", "bob", "generate", "ok"),
                                                                   ("10:06", "bob", "generate", "failed")]
    assert history.summary(capsys, *admin, "--action", "give") == [("10:01", "admin", "give", "ok"),
                                                                   ("10:03", "alice", "give", "ok")]
    assert history.summary(capsys, *admin, "--outcome", "denied") == [("10:05", "mallory", "show", "denied")]
    assert history.summary(capsys, *admin, "--since", "2025-01-31T10:02:00Z", "--until", "2025-01-31T11:04:00+01:00") \
        == ALL_UNDER_THE_AUTHORITY[2:4]  # since inclusive, until exclusive, any zone
    assert history.summary(capsys, *admin, "--since", "2025-01-31T10:05:00") == ALL_UNDER_THE_AUTHORITY[5:]  # UTC
    assert history.summary(capsys, *admin, "--limit", "2") == ALL_UNDER_THE_AUTHORITY[5:]  # the newest, in order
    assert history.summary(capsys, *admin, "--entity", "bob", "--outcome", "ok", "--since", "2025-01-31") == [
        ("10:04", "bob", "generate", "ok")]
    assert [entry["capability_id"] for entry in history.audit(capsys, *admin, "--cap", history.bobs)] == \
        [history.bobs] * 4
    assert history.audit(capsys, *admin, "--action", "give", "--entity", "bob") == []


def test_one_capabilitys_log_is_refused_to_anyone_not_at_or_above_it_and_the_refusal_recorded(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    for reader, capability in (("bob", history.alices), ("other", history.bobs), ("bob", "cap_madeup")):
        assert main(["audit", "--state-dir", str(history.state_dir), "--as", reader, "--cap", capability]) == 1
        assert f"capability '{capability}' is not held by '{reader}'" in capsys.readouterr().err
    refusals = history.summary(capsys, "--as", "admin", "--action", "audit")
    # Recorded against the capability asked about: the made-up id's refusal is below nobody's authority.
    assert [(entity, outcome) for _, entity, _, outcome in refusals] == [("bob", "denied"), ("other", "denied")]


def test_a_given_away_capability_is_no_longer_readable_by_the_giver(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SQLiteStore(history.state_dir / STORE_FILE)
    Capabilities(store).give("bob", history.bobs, "carol")
    store.close()
    assert history.audit(capsys, "--as", "bob") == []
    assert [entry["entity"] for entry in history.audit(capsys, "--as", "carol")][-1] == "bob"  # bob's give


def test_relative_times_count_back_from_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    clock = Clock()
    clock.now = time.time() - 7200
    store = SQLiteStore(state_dir / STORE_FILE)
    caps = Capabilities(store, clock=clock)
    authority = caps.create_authority("admin").id
    capability = caps.mint("admin", authority, {"server_url": SERVER, "default_model": "m"}).id  # 2 h ago
    clock.now = time.time() - 60
    caps.record("admin", capability, "generate", "ok")  # a minute ago
    store.close()
    command = ["audit", "--state-dir", str(state_dir), "--as", "admin", "--json"]
    for since, actions in (("1h", ["generate"]), ("90m", ["generate"]), ("1.5d", ["mint", "generate"]),
                           ("30s", [])):
        assert main([*command, "--since", since]) == 0
        assert [entry["action"] for entry in json.loads(capsys.readouterr().out)] == actions, since
    assert main([*command, "--until", "1h"]) == 0
    assert [entry["action"] for entry in json.loads(capsys.readouterr().out)] == ["mint"]


def test_the_text_lines_show_time_entity_capability_action_outcome_model_and_detail(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "--state-dir", str(history.state_dir), "--as", "bob", "--outcome", "failed"]) == 0
    assert capsys.readouterr().out == f"2025-01-31T10:06:00Z bob {history.bobs} generate failed boom\n"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--since", "yesterday"], "'yesterday' is invalid: must be an ISO 8601 time"),
        (["--until", "5x"], "'5x' is invalid"),
        (["--limit", "0"], "0 is invalid: must be a positive integer"),
    ],
)
def test_malformed_filters_are_usage_errors_naming_the_value(
    history: History, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "--state-dir", str(history.state_dir), "--as", "admin", *arguments])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_an_empty_time_window_is_refused_naming_both_ends(history: History, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--state-dir", str(history.state_dir), "--as", "admin", "--since", "2025-01-31T10:05Z",
                 "--until", "2025-01-31T10:05Z"]) == 1
    assert "since=2025-01-31T10:05:00Z is invalid: must be before until=2025-01-31T10:05:00Z" in \
        capsys.readouterr().err
