"""Admin lists over tables of 100,000s of rows: a count that does not read them all.

Django's admin counts the whole filtered list on every page (`COUNT(*)`), a scan that
grows with the table. `LargeTablePaginator` counts at most `count_limit` rows (more
pages than that nobody reads one by one: they filter), and for an unfiltered list on
PostgreSQL it takes the planner's estimate of the table's rows instead. Its
`count_label` says which it is ("about 100,000", "more than 10,000"); the list's
`pagination.html` shows it in place of the exact count.
"""

from __future__ import annotations

from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property


def estimated_rows(model, *, using: str = "default") -> int | None:
    """The planner's estimate of the rows of `model`'s table (kept by (auto)vacuum and
    analyze), or None where there is none (not PostgreSQL, or never analysed)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            [connection.ops.quote_name(model._meta.db_table)],
        )
        row = cursor.fetchone()
    return None if row is None or row[0] is None or row[0] < 0 else int(row[0])


class LargeTablePaginator(Paginator):
    count_limit = 10_000

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count_is_exact = True
        self.count_is_estimate = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not queryset.query.where:  # the whole table: the planner knows about how many
            estimate = estimated_rows(queryset.model, using=queryset.db)
            if estimate is not None and estimate > self.count_limit:
                self.count_is_exact, self.count_is_estimate = False, True
                return estimate
        # SELECT COUNT(*) FROM (SELECT id … LIMIT n + 1): stops at the limit, and reads
        # none of the list's annotations.
        counted = queryset.order_by().values("pk")[: self.count_limit + 1].count()
        if counted > self.count_limit:
            self.count_is_exact = False
            return self.count_limit
        return counted

    @property
    def count_label(self) -> str:
        count = self.count
        if self.count_is_exact:
            return f"{count}"
        return f"about {count:,}" if self.count_is_estimate else f"more than {count:,}"
