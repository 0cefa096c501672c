"""Read helpers every app's selectors share."""

from collections.abc import Sequence

from django.db import connection
from django.db.models import Model, QuerySet
from django.http import Http404


def get_or_404(queryset: QuerySet, **lookup):
    """The one row of `queryset` matching `lookup`; Http404 when none (or the lookup is
    malformed, e.g. not a UUID)."""
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError):
        raise Http404(f"No such {queryset.model._meta.verbose_name}.") from None


# Hot reads in SQL of their own (a chat POST's): the ORM's building and compiling of a
# query costs more CPU than the database's answer. These keep the models' own columns.


def model_columns(model: type[Model], alias: str) -> str:
    """`alias`.column, ... of every concrete field of `model`, in model_from_row's order."""
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(f.column)}" for f in model._meta.concrete_fields)


def model_from_row(model: type[Model], values: Sequence) -> Model:
    """The instance of `model` whose model_columns are `values`, as the ORM loads it (the
    fields' own conversions applied, e.g. a JSONField's)."""
    fields = model._meta.concrete_fields
    values = [
        f.from_db_value(v, None, connection) if hasattr(f, "from_db_value") else v
        for f, v in zip(fields, values, strict=True)
    ]
    return model.from_db(connection.alias, [f.attname for f in fields], values)
