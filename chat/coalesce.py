"""Fewer, larger deltas: an answer's text joined into one event per time window.

A model streams a few characters per delta; writing each to the session's stream is a
Redis round trip per delta for the worker and an event per delta for every client. The
first delta goes out at once (time to first delta is unchanged); after that, whatever
arrived within CHAT_DELTA_WINDOW_SECONDS of the last write goes out together. Items that
are not text (a provider's tool calls) pass through in order, after the text before them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from common.tracing import in_context

_END = object()


class DeltasStopped(Exception):
    """`should_stop` turned true while the provider was silent."""


# How often a silent provider's run asks whether it must stop (deadline, shutdown).
STOP_POLL_SECONDS = 0.25


def coalesced(
    deltas: Iterator[Any],
    *,
    window: float,
    max_chars: int = 2048,
    threaded: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Any]:
    """The text of `deltas`, joined per `window` seconds (at most `max_chars` at once).

    `threaded`: a thread reads `deltas`, so text that arrived just before the provider
    goes quiet is written when its window ends, not when the next delta comes. Use it
    for providers that wait on the network; a local generator that never pauses needs
    none. Closing this generator stops the reader after the delta it is waiting for.
    `should_stop` (threaded only) is asked while the provider is silent: true raises
    DeltasStopped, so a stalled provider cannot hold a run past its deadline.
    """
    if window <= 0 and not (threaded and should_stop):
        yield from deltas
    elif threaded:
        yield from _read_aside(deltas, _Window(window, max_chars), should_stop)
    else:
        held = _Window(window, max_chars)
        for delta in deltas:
            yield from held.passed(delta)
        yield from held.rest()


class _Window:
    """Text held until its window ends or it grows to `max_chars`."""

    def __init__(self, window: float, max_chars: int) -> None:
        self.window, self.max_chars = window, max_chars
        self._parts: list[str] = []
        self._size = 0
        self._flushed_at: float | None = None

    def passed(self, item: Any) -> Iterator[Any]:
        """What goes out as `item` arrives: text once its window is over; anything
        else at once, after the text before it."""
        if not isinstance(item, str):
            yield from self.rest()
            yield item
            return
        self._parts.append(item)
        self._size += len(item)
        now = time.monotonic()
        if (
            self._flushed_at is None
            or now - self._flushed_at >= self.window
            or self._size >= self.max_chars
        ):
            yield from self.flushed()

    def flushed(self) -> Iterator[str]:
        """The text held, out now; its window starts again."""
        if self._parts:
            self._flushed_at = time.monotonic()
            yield from self.rest()

    def rest(self) -> Iterator[str]:
        """The text held, out now (before something else, or at the end)."""
        if self._parts:
            yield "".join(self._parts)
            self._parts.clear()
            self._size = 0

    def due_in(self) -> float | None:
        """Seconds until the text held is due; None when none is held."""
        if not self._parts or self._flushed_at is None:
            return None
        return max(0.0, self._flushed_at + self.window - time.monotonic())


def _read_aside(
    deltas: Iterator[Any], held: _Window, should_stop: Callable[[], bool] | None
) -> Iterator[Any]:
    """`deltas` read by a thread of their own, so that `held` text goes out when its
    window ends even while the provider is silent."""
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    # in_context: the provider's HTTP spans stay children of the run's provider call.
    reader = threading.Thread(
        target=in_context(_read_into),
        args=(deltas, inbox, stop),
        name="delta-reader",
        daemon=True,
    )
    reader.start()
    try:
        while True:
            wait = held.due_in()
            if should_stop is not None:
                wait = STOP_POLL_SECONDS if wait is None else min(wait, STOP_POLL_SECONDS)
            try:
                item = inbox.get(timeout=wait)
            except queue.Empty:
                if should_stop is not None and should_stop():
                    yield from held.rest()
                    raise DeltasStopped() from None
                yield from held.flushed()
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                yield from held.rest()
                raise item
            yield from held.passed(item)
        yield from held.rest()
    finally:
        stop.set()


def _read_into(deltas: Iterator[Any], inbox: queue.SimpleQueue, stop: threading.Event) -> None:
    """Each delta into `inbox`, then _END, or the exception that ended them (raised by
    the consumer)."""
    try:
        for delta in deltas:
            inbox.put(delta)
            if stop.is_set():
                break
        inbox.put(_END)
    except BaseException as exc:  # handed to the consumer, raised there
        inbox.put(exc)
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()
