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
        return
    if not threaded:
        yield from _joined(deltas, window, max_chars)
        return
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def read() -> None:
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

    # in_context: the provider's HTTP spans stay children of the run's provider call.
    reader = threading.Thread(target=in_context(read), name="delta-reader", daemon=True)
    reader.start()
    buffer: list[str] = []
    size = 0
    flushed_at: float | None = None
    try:
        while True:
            wait = None
            if buffer and flushed_at is not None:
                wait = max(0.0, flushed_at + window - time.monotonic())
            if should_stop is not None:
                wait = STOP_POLL_SECONDS if wait is None else min(wait, STOP_POLL_SECONDS)
            try:
                item = inbox.get(timeout=wait)
            except queue.Empty:
                item = None
                if should_stop is not None and should_stop():
                    if buffer:
                        yield "".join(buffer)
                    raise DeltasStopped() from None
                if not buffer:
                    continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                if buffer:
                    yield "".join(buffer)
                raise item
            if item is not None and not isinstance(item, str):
                if buffer:
                    yield "".join(buffer)
                    buffer.clear()
                    size = 0
                yield item
                continue
            if item is not None:
                buffer.append(item)
                size += len(item)
            now = time.monotonic()
            if buffer and (
                item is None
                or flushed_at is None
                or now - flushed_at >= window
                or size >= max_chars
            ):
                yield "".join(buffer)
                buffer.clear()
                size = 0
                flushed_at = now
        if buffer:
            yield "".join(buffer)
    finally:
        stop.set()


def _joined(deltas: Iterator[Any], window: float, max_chars: int) -> Iterator[Any]:
    buffer: list[str] = []
    size = 0
    flushed_at: float | None = None
    for delta in deltas:
        if not isinstance(delta, str):
            if buffer:
                yield "".join(buffer)
                buffer.clear()
                size = 0
            yield delta
            continue
        buffer.append(delta)
        size += len(delta)
        now = time.monotonic()
        if flushed_at is None or now - flushed_at >= window or size >= max_chars:
            yield "".join(buffer)
            buffer.clear()
            size = 0
            flushed_at = now
    if buffer:
        yield "".join(buffer)
