"""Write helpers every app's services share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.db import connection, models, transaction

M = TypeVar("M", bound=models.Model)


def row_lock_for_write(model: type[M], pk: Any) -> M | None:
    """The row `pk` of `model`, held until the transaction ends against a concurrent
    delete, which then waits and sees what this transaction added under it; None if it
    was deleted first. On PostgreSQL the lock is FOR KEY SHARE: it blocks a delete (FOR
    UPDATE) but not other writers (FOR NO KEY UPDATE, all Django spells, would queue
    every writer behind the last)."""
    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(model._meta.db_table)
        column = connection.ops.quote_name(model._meta.pk.column)
        sql = f"SELECT * FROM {table} WHERE {column} = %s FOR KEY SHARE"
        found = list(model._default_manager.raw(sql, [pk]))
        return found[0] if found else None
    # SQLite: one writer at a time anyway
    return model._default_manager.select_for_update(no_key=True).filter(pk=pk).first()


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
