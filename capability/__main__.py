"""``python -m capability``: the capability layer from the command line.

Every subcommand takes ``--state-dir`` (the one ``scripts/serve`` uses: the store lives there and the local
server's key is read from there) and ``--json`` (a machine-readable result on stdout). A refusal prints one
clear line on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from inference_client.contract import Progress
from inference_client.state import STATE_DIR

from .capabilities import Capabilities, Capability
from .errors import CapabilityError, GenerationCancelledError, StoreError
from .generation import Generation, TextToImage
from .servers import ServerKeys
from .store import STORE_FILE, STORE_VARIABLE, Store, open_store, sqlite_path, store_url
from .tokens import Token, Tokens


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be a positive integer")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a port number, 0 to 65535 (0: any free port)")
    return value


def _model_list(text: str) -> list[str]:
    models = [model.strip() for model in text.split(",") if model.strip()]
    if not models:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must list model ids separated by commas")
    return models


_AGE = re.compile(r"(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _moment(text: str) -> float:
    """A Unix time from ISO 8601 (``2025-01-31``, ``2025-01-31T12:00:00Z``, ``…+02:00``; no zone: UTC) or from
    an age before now (``90s``, ``15m``, ``2h``, ``7d``, ``1w``)."""
    age = _AGE.fullmatch(text)
    if age is not None:
        return time.time() - float(age["amount"]) * _UNIT_SECONDS[age["unit"]]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))  # Python 3.10 does not read "Z"
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid: must be an ISO 8601 time (2025-01-31T12:00:00Z; no zone: UTC) or an age "
            "like 90s, 15m, 2h, 7d, 1w") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``12h``, ``30d`` or ``1w``."""
    age = _AGE.fullmatch(text)
    try:
        seconds = float(age["amount"]) * _UNIT_SECONDS[age["unit"]] if age else float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a duration like 3600 (seconds), 90s, 15m, "
                                         "12h, 30d or 1w")
    return seconds


def _add_audit_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", parents=parents,
        help="uses and refusals of the capabilities you hold and of those below them, oldest first",
        description="Audit entries of every capability ENTITY (--as) holds and of every capability delegated "
                    "or minted below them, oldest first; the filters narrow them. Times are UTC.")
    audit.add_argument("--cap", metavar="ID", help="that capability only (yours, or one below yours)")
    audit.add_argument("--entity", dest="actor", metavar="ENTITY", help="entries of this acting entity only")
    audit.add_argument("--action", help="mint, delegate, give, revoke, show, audit or generate")
    audit.add_argument("--outcome", help="ok, denied, failed or cancelled")
    audit.add_argument("--since", type=_moment, metavar="TIME",
                       help="from this time on (ISO 8601, e.g. 2025-01-31T12:00:00Z, or an age: 90s, 15m, 2h, 7d)")
    audit.add_argument("--until", type=_moment, metavar="TIME", help="before this time (same forms as --since)")
    audit.add_argument("--limit", type=_positive, metavar="N", help="the N most recent matching entries")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help="state dir of scripts/serve: the local server's key, and the SQLite store unless "
                             "--store names another (default: %(default)s)")
    common.add_argument("--store", metavar="URL", default=None,
                        help=f"the capability store: sqlite:///PATH or postgresql://USER@HOST:PORT/DB, the password "
                             f"from PGPASSFILE, PGPASSWORD or a service file (default: ${STORE_VARIABLE}, else "
                             f"{STORE_FILE} in the state dir)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    acting = argparse.ArgumentParser(add_help=False)
    acting.add_argument("--as", dest="entity", required=True, metavar="ENTITY", help="the entity acting")
    restrictions = argparse.ArgumentParser(add_help=False)
    restrictions.add_argument("--allowed-models", type=_model_list, metavar="M1,M2")
    for limit in ("max-concurrent", "max-width", "max-height", "max-steps"):
        restrictions.add_argument(f"--{limit}", type=_positive, metavar="N")
    restrictions.add_argument("--expires-in", type=_positive, metavar="SECONDS")

    parser = argparse.ArgumentParser(prog="python -m capability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = commands.add_parser("init", parents=[common], help="create the store and a sys.mint authority")
    init.add_argument("--admin", required=True, metavar="ENTITY")
    init.add_argument("--namespace", default="diffusers")
    mint = commands.add_parser("mint", parents=[common, acting, restrictions],
                               help="mint a diffusers.generate capability")
    mint.add_argument("--authority", required=True, metavar="ID")
    mint.add_argument("--server-url", required=True, metavar="URL")
    mint.add_argument("--default-model", required=True, metavar="MODEL")
    delegate = commands.add_parser("delegate", parents=[common, acting, restrictions],
                                   help="delegate a narrower capability to yourself (give it on after)")
    delegate.add_argument("--cap", required=True, metavar="ID")
    delegate.add_argument("--default-model", metavar="MODEL")
    give = commands.add_parser("give", parents=[common, acting], help="move a capability to another entity")
    give.add_argument("--cap", required=True, metavar="ID")
    give.add_argument("--to", required=True, metavar="ENTITY")
    for name, text in (("revoke", "revoke a capability and everything delegated from it"),
                       ("show", "show one capability")):
        command = commands.add_parser(name, parents=[common, acting], help=text)
        command.add_argument("--cap", required=True, metavar="ID")
    _add_audit_parser(commands, [common, acting])
    commands.add_parser("list", parents=[common, acting], help="the capabilities an entity holds")
    generate = commands.add_parser("generate", parents=[common, acting], help="textToImage with a capability")
    generate.add_argument("--cap", required=True, metavar="ID")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--steps", type=int)
    generate.add_argument("--guidance", type=float)
    generate.add_argument("--negative")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--model")
    generate.add_argument("--out", type=Path, metavar="FILE.png", help="write the PNG here")
    generate.add_argument("--progress", action="store_true",
                          help="show a progress bar on stderr (the model's streaming variant, over gRPC); "
                               "Ctrl-C then cancels the generation on the server")
    _add_store_parser(commands)
    _add_token_parser(commands, [common, acting])
    _add_serve_parser(commands, common)
    register = commands.add_parser("register-server", parents=[common],
                                   help="store the inference key of a server not started in this state dir")
    register.add_argument("--url", required=True)
    register.add_argument("--key-file", type=Path, required=True)
    register.add_argument("--grpc-address", metavar="HOST:PORT",
                          help="its gRPC endpoint, for progress and cancellation (generate --progress)")
    return parser


def _add_store_parser(commands: Any) -> None:
    store = commands.add_parser("store", help="the store itself: migrate it into another")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    migrate = store_commands.add_parser(
        "migrate", help="copy capabilities, audit, servers and tokens (not live leases) into another store, e.g. "
                        "SQLite into PostgreSQL; checks counts and a content digest; safe to run twice")
    migrate.add_argument("--from", dest="source", required=True, metavar="URL", help="the store to copy")
    migrate.add_argument("--to", dest="target", required=True, metavar="URL", help="the store to copy into")
    migrate.add_argument("--force", action="store_true",
                         help="replace what a non-empty target holds (refused without it)")
    migrate.add_argument("--key-dir", type=Path, metavar="DIR",
                         help="into a store that keeps no keys (PostgreSQL): write each registered server's key "
                              "here (mode 0600) and register the file's path")
    migrate.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_token_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="bearer tokens of the HTTP service (admins only)",
                                description="Bearer tokens with which entities call the HTTP service (serve). Only "
                                            "the owner of a sys.mint authority (--as ADMIN) manages them.")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    issue = token_commands.add_parser("issue", parents=parents,
                                      help="issue a token to an entity; it is printed once, and only its digest kept")
    issue.add_argument("--entity", dest="entity_to_issue", required=True, metavar="ENTITY",
                       help="who the token speaks for")
    issue.add_argument("--expires-in", type=_duration, default=_duration("90d"), metavar="DURATION",
                       help="3600 (seconds), 90s, 15m, 12h, 30d or 1w; at most about five years (default: 90d)")
    revoke = token_commands.add_parser("revoke", parents=parents, help="refuse a token from now on")
    revoke.add_argument("--token", required=True, metavar="ID",
                        help="its id, as token list shows it, or the whole token (a leaked one)")
    listing = token_commands.add_parser("list", parents=parents, help="the tokens issued (never their secrets)")
    listing.add_argument("--entity", dest="entity_filter", metavar="ENTITY", help="only this entity's")


def _add_serve_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser(
        "serve", parents=[common], help="the HTTP service: the capability layer for any language, and a web page",
        description="Serve the capability layer over HTTP (docs/service.md): prints READY URL when it serves, stops "
                    "cleanly on SIGTERM or Ctrl-C (running requests finish first).")
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to bind (default: %(default)s, loopback only; 0.0.0.0 in a container)")
    serve.add_argument("--port", type=_port, default=8080, help="(default: %(default)s; 0: any free port)")
    serve.add_argument("--max-body-bytes", type=_positive, default=64 * 1024, metavar="N",
                       help="larger request bodies are refused before they are read (default: %(default)s)")
    serve.add_argument("--trusted-header", metavar="NAME",
                       help="believe this header as the entity, from --trusted-proxy addresses only (an "
                            "authenticating proxy in front); off by default")
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                       help="an address or network allowed to send --trusted-header (repeat for several)")
    serve.add_argument("--forwarded-allow-ips", action="append", default=[], metavar="CIDR",
                       help="proxies in front (an ingress) whose X-Forwarded-For names the client, so that failed "
                            "authentications are counted per client, not per proxy (repeat for several)")
    serve.add_argument("--graceful-seconds", type=float, default=60.0, metavar="S",
                       help="on SIGTERM, how long running requests may finish (default: %(default)s)")


def _restrictions(arguments: argparse.Namespace, capabilities: Capabilities) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in ("allowed_models", "max_concurrent", "max_width", "max_height", "max_steps", "default_model"):
        value = getattr(arguments, name, None)
        if value is not None:
            values[name] = value
    if arguments.expires_in is not None:  # from the store's clock, which judges expiry, not this host's
        values["expires_at"] = capabilities.now() + arguments.expires_in
    return values


def _open_store(arguments: argparse.Namespace) -> Store:
    url = store_url(arguments.store, arguments.state_dir)
    if arguments.command != "init" and url.startswith("sqlite:") and not sqlite_path(url).exists():
        where = f"--store {url}" if arguments.store else f"--state-dir {arguments.state_dir}"
        raise StoreError(f"no capability store at {sqlite_path(url)}: create it with "
                         f"python -m capability init --admin ENTITY {where}")
    return open_store(url, arguments.state_dir)


Result = tuple[Any, str]
"""A command's JSON-able result and its human-readable line(s)."""


def _init(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    authority = capabilities.create_authority(arguments.admin, arguments.namespace)
    return authority.as_dict(), authority.id


def _mint(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    params = {"server_url": arguments.server_url, "default_model": arguments.default_model,
              **_restrictions(arguments, capabilities)}
    minted = capabilities.mint(arguments.entity, arguments.authority, params)
    return minted.as_dict(), minted.id


def _delegate(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    child = capabilities.delegate(arguments.entity, arguments.cap, _restrictions(arguments, capabilities))
    return child.as_dict(), child.id


def _give(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    given = capabilities.give(arguments.entity, arguments.cap, arguments.to)
    return given.as_dict(), f"{given.id} now belongs to {given.owner}"


def _revoke(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    revoked = capabilities.revoke(arguments.entity, arguments.cap)
    return {"revoked": revoked}, f"revoked {len(revoked)} capabilities: {' '.join(revoked)}"


def _show(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    shown = capabilities.show(arguments.entity, arguments.cap)
    return shown.as_dict(), _describe(shown)


def _list(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    owned = capabilities.owned(arguments.entity)
    return [item.as_dict() for item in owned], "\n".join(_describe(item) for item in owned)


def _audit(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    entries = capabilities.audit_entries(
        arguments.entity, capability_id=arguments.cap, entity=arguments.actor, action=arguments.action,
        outcome=arguments.outcome, since=arguments.since, until=arguments.until, limit=arguments.limit)
    lines = [" ".join(str(part) for part in (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["at"])), entry["entity"], entry["capability_id"],
        entry["action"], entry["outcome"], entry["model"], entry["detail"]) if part) for entry in entries]
    return entries, "\n".join(lines)


def _register_server(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    url = ServerKeys(capabilities.store, arguments.state_dir).register(arguments.url, arguments.key_file,
                                                                       arguments.grpc_address)
    return {"registered": url}, f"registered the key of {url}"


def _generate(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    options = {name: value for name, value in (
        ("width", arguments.width), ("height", arguments.height), ("numInferenceSteps", arguments.steps),
        ("guidanceScale", arguments.guidance), ("negativePrompt", arguments.negative),
        ("seed", arguments.seed), ("modelId", arguments.model)) if value is not None}
    generator = TextToImage(capabilities.store, arguments.state_dir)
    try:
        if arguments.progress:
            result = _generate_with_progress(generator, arguments, options)
        else:
            result = generator.text_to_image(arguments.entity, arguments.cap, arguments.prompt, options)
    finally:
        generator.close()
    line = f"{result['model']} {result['width']}x{result['height']} seed {result['seed']}"
    if arguments.out is not None:
        arguments.out.write_bytes(base64.b64decode(result["image"]))
        line += f" -> {arguments.out}"
    return result, line


def _generate_with_progress(generator: TextToImage, arguments: argparse.Namespace,
                            options: dict[str, Any]) -> dict[str, Any]:
    bar = ProgressBar(sys.stderr)
    generation = Generation(lambda cancellation: generator.text_to_image(
        arguments.entity, arguments.cap, arguments.prompt, options, on_progress=bar.show, cancellation=cancellation),
        cleanup=generator.release_thread_clients)
    try:
        return generation.result()
    except KeyboardInterrupt:
        bar.close("cancelling… (Ctrl-C again to stop waiting for the server to confirm)")
        generation.cancel()
        try:
            return generation.result()  # raises GenerationCancelledError, or the image if it was done already
        except KeyboardInterrupt:
            raise GenerationCancelledError("cancelled by the caller; not waiting for the server to confirm") from None
    finally:
        bar.close()


class ProgressBar:
    """One line on a terminal, redrawn at every step: ``[#####     ] 5/10 steps  1.2 s``."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.drawn = False

    def show(self, progress: Progress) -> None:
        filled = self.WIDTH * progress.steps_done // max(progress.steps, 1)
        self.stream.write(f"\r[{'#' * filled}{' ' * (self.WIDTH - filled)}] {progress.steps_done}/{progress.steps} "
                          f"steps  {progress.elapsed_s:.1f} s")
        self.stream.flush()
        self.drawn = True

    def close(self, then: str = "") -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        if then:
            self.stream.write(then + "\n")
        self.stream.flush()


def _token(arguments: argparse.Namespace, capabilities: Capabilities) -> Result:
    tokens = Tokens(capabilities.store)
    if arguments.token_command == "issue":  # noqa: S105 - a subcommand's name
        issued = tokens.issue(arguments.entity, arguments.entity_to_issue, arguments.expires_in)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued.described.expires_at or 0))
        return ({"token": issued.token, **issued.described.as_dict()},
                f"{issued.token}\n(token {issued.described.id} for {issued.described.entity}, expires {expires}; "
                "shown this once: only its digest is kept)")
    if arguments.token_command == "revoke":  # noqa: S105 - a subcommand's name
        revoked = tokens.revoke(arguments.entity, arguments.token)
        return revoked.as_dict(), f"revoked token {revoked.id} of {revoked.entity}"
    listed = tokens.list(arguments.entity, arguments.entity_filter)
    return [token.as_dict() for token in listed], "\n".join(_describe_token(token) for token in listed)


def _describe_token(token: Token) -> str:
    def when(moment: float | None) -> str:
        return "never" if moment is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
    state = "revoked" if token.revoked_at is not None else f"expires {when(token.expires_at)}"
    return f"{token.id} entity={token.entity} issued-by={token.issued_by} issued {when(token.created_at)} {state}"


COMMANDS = {
    "init": _init, "mint": _mint, "delegate": _delegate, "give": _give, "revoke": _revoke, "show": _show,
    "list": _list, "audit": _audit, "register-server": _register_server, "generate": _generate, "token": _token,
}


def run(arguments: argparse.Namespace) -> Result:
    """Carry out one command."""
    if arguments.command == "store":
        return _migrate(arguments)
    store = _open_store(arguments)
    if arguments.command == "serve":
        try:
            from .service.server import serve
        except ImportError as error:
            store.close()
            raise SystemExit(f"error: the HTTP service needs the [service] extra ({error}): pip install "
                             "'triton-diffusers[service]'") from None
        serve(arguments, store)  # closes the store
        return None, ""
    try:
        return COMMANDS[arguments.command](arguments, Capabilities(store))
    finally:
        store.close()


def _migrate(arguments: argparse.Namespace) -> Result:
    from .migrate import migrate

    nowhere = Path("/nonexistent")  # both URLs say where the stores are
    if arguments.source.startswith("sqlite:") and not sqlite_path(arguments.source).exists():
        raise StoreError(f"no capability store at {sqlite_path(arguments.source)} to migrate from")
    source = open_store(arguments.source, nowhere)
    try:
        target = open_store(arguments.target, nowhere)
        try:
            done = migrate(source, target, force=arguments.force, key_dir=arguments.key_dir)
        finally:
            target.close()
    finally:
        source.close()
    counts = ", ".join(f"{count} {table}" for table, count in done.counts.items())
    if not done.copied:
        return done.as_dict(), f"{target.url} already holds the content of {source.url} ({counts}): nothing to do"
    return done.as_dict(), f"copied {counts} from {source.url} to {target.url}; digest {done.digest[:16]}… matches"


def _describe(capability: Capability) -> str:
    state = "revoked" if capability.revoked_at is not None else "active"
    return f"{capability.id} {capability.type} owner={capability.owner} {state} {json.dumps(capability.params)}"


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        result, text = run(arguments)
    except GenerationCancelledError as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return 130  # as for any command stopped by Ctrl-C
    except CapabilityError as error:
        if arguments.json:
            print(json.dumps({"error": type(error).__name__, "message": str(error)}))
        print(f"refused: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # both stores raise StoreError for their own failures (above)
        print(f"error: {error}", file=sys.stderr)
        return 1
    if arguments.command != "serve":
        print(json.dumps(result, indent=2) if arguments.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
