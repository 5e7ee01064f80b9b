"""The launcher's state dir: private when created, refused when others could write to it (no Triton)."""

from __future__ import annotations

import fcntl
import stat
from pathlib import Path

import pytest

from inference_client.state import INFER_KEY_FILE, SERVER_FILE, InferKeyFileError, read_infer_key_file
from triton_launcher.errors import ServerStartError
from triton_launcher.paths import STATE_LOCK_FILE
from triton_launcher.server import ServerOptions, TritonServer, free_port, prepare_state_dir, write_private_file


def test_prepare_state_dir_creates_it_private_when_missing(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "state"
    prepare_state_dir(state_dir)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_prepare_state_dir_refuses_and_leaves_mode_alone_when_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ServerStartError, match=r"mode 777\) must belong to this user and be writable by it alone"):
        prepare_state_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777


def test_prepare_state_dir_accepts_an_existing_private_dir_when_reused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    prepare_state_dir(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_write_private_file_creates_mode_0600_when_writing_a_key(tmp_path: Path) -> None:
    key_file = tmp_path / "infer-key"
    write_private_file(key_file, "secret\n")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text() == "secret\n"
    assert [path.name for path in tmp_path.iterdir()] == ["infer-key"]


def test_server_refuses_a_state_dir_and_leaves_its_files_when_another_server_holds_it(tmp_path: Path) -> None:
    (tmp_path / SERVER_FILE).write_text("{}")
    with (tmp_path / STATE_LOCK_FILE).open("ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ServerStartError, match="belongs to another running server"), TritonServer(
            ServerOptions(model_repository=tmp_path, state_dir=tmp_path)
        ):
            pass
    assert (tmp_path / SERVER_FILE).read_text() == "{}"


OPERATOR_KEY = "k8s-secret-" + "0123456789abcdef" * 2


@pytest.mark.parametrize(("content", "rule"), [
    (None, "cannot be read: No such file or directory"),
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ("short-key\n", "holds 9 characters that are not a usable key: the key must be 24 to 512 characters"),
    (OPERATOR_KEY + " trailing words\n", "holds 58 characters that are not a usable key"),
    (OPERATOR_KEY[:-1] + ",\n", "holds 43 characters that are not a usable key"),
    ("x" * 513, "holds 513 characters"),
])
def test_an_unusable_operator_key_file_is_refused_naming_the_file_and_the_rule_never_the_key(
    tmp_path: Path, content: str | None, rule: str,
) -> None:
    path = tmp_path / "infer-key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InferKeyFileError) as refused:
        read_infer_key_file(path)
    message = str(refused.value)
    assert message.startswith(f"inference key file {path} ")
    assert rule in message
    assert "secrets.token_urlsafe(32)" in message or "cannot be read" in message
    if content and content.strip():
        assert content.strip() not in message
        assert OPERATOR_KEY[:12] not in message


def test_an_operator_key_file_gives_its_key_without_the_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "infer-key"
    path.write_text(f"  {OPERATOR_KEY}\n")
    assert read_infer_key_file(path) == OPERATOR_KEY
    path.write_bytes(b"\xff\xfe" + OPERATOR_KEY.encode())
    with pytest.raises(InferKeyFileError, match="is not UTF-8 text"):
        read_infer_key_file(path)


def test_a_server_given_an_unusable_key_file_does_not_start_and_writes_no_key(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    (tmp_path / "infer-key").write_text("too-short\n")
    options = ServerOptions(model_repository=tmp_path, state_dir=state_dir, http_port=free_port(),
                            infer_key_file=tmp_path / "infer-key")
    with pytest.raises(ServerStartError, match=r"holds 9 characters .*\(--infer-key-file\)"), TritonServer(options):
        pass
    assert not (state_dir / INFER_KEY_FILE).exists()


def test_an_operator_key_file_that_others_can_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "infer-key"
    path.write_text(OPERATOR_KEY + "\n")
    path.chmod(0o664)
    with pytest.raises(InferKeyFileError, match=r"\(mode 664\) can be written by others than its owner: .*chmod go-w"):
        read_infer_key_file(path)
    path.chmod(0o644)  # readable by others, as a Secret mounted with the default mode is: accepted
    assert read_infer_key_file(path) == OPERATOR_KEY


def test_serve_refuses_an_unusable_key_file_before_building_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from triton_launcher.__main__ import main

    (tmp_path / "infer-key").write_text("too-short\n")
    code = main(["--tiny", "--state-dir", str(tmp_path / "state"), "--infer-key-file", str(tmp_path / "infer-key")])
    assert code == 1
    error = capsys.readouterr().err
    assert f"scripts/serve: inference key file {tmp_path / 'infer-key'} holds 9 characters" in error
    assert "building the tiny models" not in error
    assert not (tmp_path / "state").exists()
