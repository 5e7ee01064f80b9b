"""Who is calling: a bearer token (capability.tokens), or a header set by a trusted authenticating proxy.

Failed attempts are counted per client address: after a few, that address is refused for a while, doubling with
each further failure, so that guessing tokens costs time (a token's 256 random bits make guessing hopeless
anyway; the back-off keeps the store from being hammered by it). A token is never logged, nor echoed.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from capability.capabilities import check_entity
from capability.errors import CapabilityError, InvalidParamsError, UnauthenticatedError
from capability.tokens import Tokens

logger = logging.getLogger(__name__)

FREE_FAILURES = 5
"""Failures an address may make before it is slowed down (a person mistyping, a client with a stale token)."""
FIRST_PENALTY_S = 1.0
MAX_PENALTY_S = 300.0
FORGET_AFTER_S = 900.0
"""An address that has not failed for this long starts afresh."""
MAX_TRACKED_ADDRESSES = 10_000
"""The failure table's bound: the oldest entries go first (a flood from many addresses cannot fill memory)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TooManyFailuresError(CapabilityError):
    """The address failed to authenticate too often: it must wait ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"too many failed authentications from this address: retry in {math.ceil(retry_after_s)} s")


@dataclass
class _Failures:
    count: int
    last_at: float
    blocked_until: float


class FailedAttempts:
    """Failed authentications per address, and the back-off they earn. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_address: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str) -> None:
        """Raise TooManyFailuresError while ``address`` is blocked."""
        with self._lock:
            failures = self._by_address.get(address)
            now = self.clock()
            if failures is not None and failures.blocked_until > now:
                raise TooManyFailuresError(failures.blocked_until - now)

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            failures = self._by_address.pop(address, None)
            if failures is None or now - failures.last_at > FORGET_AFTER_S:
                failures = _Failures(count=0, last_at=now, blocked_until=now)
            failures.count += 1
            failures.last_at = now
            beyond = failures.count - FREE_FAILURES
            if beyond > 0:
                failures.blocked_until = now + min(FIRST_PENALTY_S * 2 ** (beyond - 1), MAX_PENALTY_S)
            self._by_address[address] = failures  # most recent last
            while len(self._by_address) > MAX_TRACKED_ADDRESSES:
                self._by_address.popitem(last=False)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._by_address.pop(address, None)


class Authenticator:
    """The entity behind a request's ``Authorization`` header or, from a trusted proxy, its trusted header."""

    def __init__(self, tokens: Tokens, *, trusted_header: str | None = None, trusted_proxies: Sequence[str] = (),
                 forwarded_from: Sequence[str] = (), failures: FailedAttempts | None = None) -> None:
        if trusted_header is not None and not trusted_proxies:
            raise InvalidParamsError(f"--trusted-header {trusted_header} needs --trusted-proxy: the addresses of the "
                                     "authenticating proxy, the only ones whose header is believed")
        if trusted_proxies and trusted_header is None:
            raise InvalidParamsError("--trusted-proxy needs --trusted-header: the header that names the entity")
        self.tokens = tokens
        self.trusted_header = trusted_header.lower() if trusted_header else None
        self.trusted_networks = tuple(_network(text, "--trusted-proxy") for text in trusted_proxies)
        self.forwarding_networks = tuple(_network(text, "--forwarded-allow-ips") for text in forwarded_from)
        self.failures = failures or FailedAttempts()

    def authenticate(self, peer: str, authorization: str | None, trusted_value: str | None,
                     forwarded_for: str | None = None) -> str:
        """The calling entity; UnauthenticatedError or TooManyFailuresError otherwise. Blocking (reads the store).

        ``peer`` is the address the connection comes from, ``forwarded_for`` the X-Forwarded-For header."""
        address = self.client_address(peer, forwarded_for)
        self.failures.check(address)
        if authorization is None and trusted_value is None:  # not a failed guess: a page before its token is pasted
            raise UnauthenticatedError("no credentials: send Authorization: Bearer <token> (python -m capability "
                                       "token issue gives one)")
        try:
            entity = self._entity(peer, authorization, trusted_value)
        except UnauthenticatedError as error:
            self.failures.failed(address)
            logger.info("authentication failed from %s: %s", address, error)
            raise
        self.failures.succeeded(address)
        return entity

    def _entity(self, address: str, authorization: str | None, trusted_value: str | None) -> str:
        if trusted_value is not None and self.trusted_header is not None:
            if not self._trusted(address):
                raise UnauthenticatedError(f"the {self.trusted_header} header is believed only from the configured "
                                           f"authenticating proxies, and {address} is not one")
            try:
                return check_entity(trusted_value)
            except InvalidParamsError as error:
                raise UnauthenticatedError(f"the {self.trusted_header} header is invalid: {error}") from None
        if authorization is None:
            raise UnauthenticatedError("no credentials: send Authorization: Bearer <token> (python -m capability "
                                       "token issue gives one)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("the Authorization header must be Bearer <token>")
        return self.tokens.authenticate(token.strip())

    def _trusted(self, address: str) -> bool:
        return _within(address, self.trusted_networks)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """Whom failures are counted against: the peer, or, behind proxies listed in --forwarded-allow-ips, the
        first address in X-Forwarded-For (from the right) that is not one of them. Without this, every client
        behind an ingress would share its address, and one of them could lock all the others out."""
        if not forwarded_for or not _within(peer, self.forwarding_networks):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not _within(hop, self.forwarding_networks):
                return hop
        return hops[0] if hops else peer


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _network(text: str, option: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise InvalidParamsError(f"{option} {text!r} is invalid: must be an address or a network like "
                                 "10.0.0.0/8") from None
