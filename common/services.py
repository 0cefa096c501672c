"""Write helpers every app's services share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.db import models, transaction

M = TypeVar("M", bound=models.Model)


def model_update(
    *, instance: M, fields: Iterable[str], data: dict[str, Any], auto_updated_at: bool = True
) -> tuple[M, bool]:
    """Set the `fields` of `instance` that `data` holds and save only those (plus
    `updated_at` when the model has one). Returns (instance, whether anything changed);
    an unchanged instance is not written."""
    changed = [f for f in fields if f in data and getattr(instance, f) != data[f]]
    for field in changed:
        setattr(instance, field, data[field])
    if not changed:
        return instance, False
    update_fields = list(changed)
    if auto_updated_at and any(f.name == "updated_at" for f in instance._meta.fields):
        update_fields.append("updated_at")
    instance.save(update_fields=update_fields)
    return instance, True


def on_commit_robust(func: Callable[[], Any], *, name: str) -> None:
    """Run `func` after the current transaction commits. A failure is logged, never
    raised into the request that committed: the write stands, and whatever `func` was
    for must be repaired by a later pass. `name` names the hook in that log line."""

    def hook() -> None:
        func()

    # Django names a failed robust hook by its __qualname__ (a partial has none).
    hook.__qualname__ = hook.__name__ = name
    transaction.on_commit(hook, robust=True)
