"""Run leases: while a worker process runs agent runs, one thread of it renews their
leases in the database every third of RUN_LEASE_SECONDS. A run whose lease expired
(its worker was killed, or lost the database) is taken back by the recovery pass and
dispatched again, without waiting for the broker's visibility timeout.

A renewal also tells the run what happened to it meanwhile: `cancelled` (a user
cancelled it) or `lost` (it was taken back, or its row is gone): the run stops.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection

from common.singletons import process_singleton

from . import state
from .models import Run

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Held:
    run_id: uuid.UUID
    attempt: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()


class LeaseKeeper:
    def __init__(self) -> None:
        self._held: dict[uuid.UUID, Held] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, run_id: uuid.UUID, attempt: int) -> Iterator[Held]:
        held = Held(run_id=run_id, attempt=attempt)
        with self._lock:
            self._held[run_id] = held
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="run-leases", daemon=True)
                self._thread.start()
        try:
            yield held
        finally:
            with self._lock:
                if self._held.get(run_id) is held:
                    del self._held[run_id]

    def held(self) -> list[Held]:
        with self._lock:
            return list(self._held.values())

    def _loop(self) -> None:
        while True:
            self._wake.wait(settings.RUN_LEASE_SECONDS / 3)
            self._wake.clear()
            try:
                self.renew()
            except Exception:
                logger.warning("could not renew run leases", exc_info=True)
            finally:
                connection.close()  # this thread's; a renewal every few seconds needs none

    def renew(self) -> None:
        """Extend the leases of the runs held here; flag those cancelled or lost."""
        held = self.held()
        if not held:
            return
        now = state.leases_renew(held=[(h.run_id, h.attempt) for h in held])
        for h in held:
            attempt, status = now.get(h.run_id, (None, None))
            if attempt == h.attempt and status == Run.Status.CANCELLED:
                h.cancelled.set()
            elif attempt != h.attempt or status != Run.Status.RUNNING:
                h.lost.set()


@process_singleton()
def lease_keeper() -> LeaseKeeper:
    """This process's keeper (a forked pool process starts its own)."""
    return LeaseKeeper()
