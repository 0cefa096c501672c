"""Process-wide singletons: `functools.cache` for a factory without arguments, made safe
for the objects this project keeps one of per process (Redis clients, the vector store,
the embedder, the WorkerSpaceManager).

- One instance even when threads race on the first call (the factory runs once): some
  factories may not run twice, e.g. Qdrant local mode locks its folder.
- `cache_clear()` drops the instance (calling `close` on it), and it happens by itself
  when a setting it depends on changes (`override_settings` in tests, `setting_changed`).
- A forked child (Celery prefork) starts without the parent's instance; the parent's is
  not closed there, since its sockets and locks still belong to the parent.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from django.core.signals import setting_changed

T = TypeVar("T")

_MISSING: Any = object()
_all: list[ProcessSingleton] = []


class ProcessSingleton(Generic[T]):
    def __init__(
        self,
        factory: Callable[[], T],
        *,
        settings: Iterable[str] = (),
        close: Callable[[T], Any] | None = None,
    ) -> None:
        functools.update_wrapper(self, factory)
        self._factory = factory
        self._close = close
        self.settings = frozenset(settings)
        self._lock = threading.Lock()
        self._value: Any = _MISSING
        _all.append(self)

    def __call__(self) -> T:
        value = self._value
        if value is _MISSING:
            with self._lock:
                if self._value is _MISSING:
                    self._value = self._factory()
                value = self._value
        return value

    def peek(self) -> T | None:
        """The instance if one was made, without making it."""
        value = self._value
        return None if value is _MISSING else value

    def cache_clear(self) -> None:
        """Forget the instance (closing it); the next call makes a new one."""
        with self._lock:
            value, self._value = self._value, _MISSING
        if value is not _MISSING and self._close is not None:
            self._close(value)

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._value = _MISSING


def process_singleton(
    *, settings: Iterable[str] = (), close: Callable[[Any], Any] | None = None
) -> Callable[[Callable[[], T]], ProcessSingleton[T]]:
    """Decorate a factory without arguments: the process gets one instance of what it
    makes, reset when one of `settings` changes."""

    def decorate(factory: Callable[[], T]) -> ProcessSingleton[T]:
        return ProcessSingleton(factory, settings=settings, close=close)

    return decorate


def _reset_on_setting_changed(*, setting: str, **_: Any) -> None:
    for singleton in list(_all):
        if setting in singleton.settings:
            singleton.cache_clear()


def _forget_all_after_fork() -> None:
    for singleton in _all:
        singleton._forget_after_fork()


setting_changed.connect(_reset_on_setting_changed, dispatch_uid="common.singletons")
os.register_at_fork(after_in_child=_forget_all_after_fork)
