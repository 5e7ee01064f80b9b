"""Cancelling a generation that another instance runs: PostgreSQL's LISTEN/NOTIFY between the instances.

A streaming generation lives in the instance that holds its stream; behind a load balancer, the ``DELETE`` that
cancels it may reach any instance. That instance, not finding it, asks all of them on one channel of the shared
store's database; the one that runs it (for that entity) cancels it and answers on the same channel, and only
then does the ``DELETE`` get its 202. No answer within a couple of seconds: 404, as for an unknown id. Nothing is
written to the store: a notification is a message, not a row.

With the SQLite store there is one host, and usually one instance: no relay.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from capability.store import Store

logger = logging.getLogger(__name__)

CHANNEL = "capability_generation_cancel"
ANSWER_TIMEOUT_S = 2.0
"""How long a DELETE waits for the instance that runs the generation to say it cancelled it."""
RECONNECT_DELAY_S = 1.0
MAX_RECONNECT_DELAY_S = 30.0


class CancelRelay:
    """Listens on :data:`CHANNEL` for cancellations asked by other instances, and asks them for this one's."""

    def __init__(self, store: Store, cancel_here: Callable[[str, str], bool]) -> None:
        """``cancel_here(entity, generation)``: cancel it if it runs in this instance for that entity."""
        self.store = store
        self.cancel_here = cancel_here
        self._waiting: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capability-cancel-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait_until_listening(self, timeout_s: float) -> bool:
        return self._listening.wait(timeout_s)

    def ask(self, entity: str, generation: str, timeout_s: float = ANSWER_TIMEOUT_S) -> bool:
        """Ask every instance to cancel ``entity``'s ``generation``; whether one said it did. Blocking."""
        answered = threading.Event()
        with self._lock:
            self._waiting[generation] = answered
        try:
            self._notify({"ask": generation, "entity": entity})
            return answered.wait(timeout_s)
        finally:
            with self._lock:
                self._waiting.pop(generation, None)

    def _notify(self, message: dict[str, Any]) -> None:
        with self.store.write() as db:
            db.execute("SELECT pg_notify(?, ?) AS sent", (CHANNEL, json.dumps(message)))

    def _run(self) -> None:
        delay = RECONNECT_DELAY_S
        while not self._stop.is_set():
            try:
                # The store's URL holds no password: libpq finds it where the store's own connections do.
                with psycopg.connect(self.store.url, autocommit=True, connect_timeout=10) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = RECONNECT_DELAY_S
                    while not self._stop.is_set():
                        for notification in connection.notifies(timeout=1.0):
                            self._handle(notification.payload)
            except psycopg.Error as error:
                self._listening.clear()
                logger.warning("the cancel relay lost its connection (%s); listening again in %.0f s", error, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, MAX_RECONNECT_DELAY_S)

    def _handle(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            if "ask" in message:
                if self.cancel_here(str(message["entity"]), str(message["ask"])):
                    self._notify({"cancelled": message["ask"]})
            elif "cancelled" in message:
                with self._lock:
                    answered = self._waiting.get(str(message["cancelled"]))
                if answered is not None:
                    answered.set()
        except Exception:  # one bad message must not end the relay
            logger.warning("the cancel relay could not handle a message", exc_info=True)
