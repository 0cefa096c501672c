"""Raw usage rows become daily rollups (`UsageDaily`) before they are deleted: by the
retention sweep (old rows, in bounded chunks) and when a user is deleted (their rows,
anonymised). Each call is one short transaction over at most `limit` raw rows."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db import transaction
from django.db.models import QuerySet

from .models import EmbeddingUsage, RunUsage, UsageDaily

RUN_SUMS = ("prompt_tokens", "completion_tokens", "total_tokens", "tool_calls")


def _add(totals: dict[tuple, dict[str, int]], key: tuple, **amounts: int) -> None:
    entry = totals[key]
    for name, amount in amounts.items():
        entry[name] = entry.get(name, 0) + int(amount or 0)


def _store(totals: dict[tuple, dict[str, int]]) -> None:
    for (day, project_id, user_id, agent_id, model), amounts in totals.items():
        row, _ = UsageDaily.objects.select_for_update().get_or_create(
            day=day, project_id=project_id, user_id=user_id, agent_id=agent_id, model=model
        )
        for name, amount in amounts.items():
            setattr(row, name, getattr(row, name) + amount)
        row.save()


def usage_rollup_chunk(
    *,
    runs: QuerySet[RunUsage],
    embeddings: QuerySet[EmbeddingUsage],
    limit: int,
    anonymise: bool = False,
) -> dict[str, int]:
    """Fold at most `limit` rows of each queryset into the daily rollups and delete them,
    in one transaction. `anonymise`: the rollups keep no user id. Returns how many raw
    rows of each kind went."""
    totals: dict[tuple, dict[str, int]] = defaultdict(dict)
    with transaction.atomic():
        run_rows = list(runs.select_for_update().order_by("day", "run_id")[:limit])
        for row in run_rows:
            key = (row.day, row.project_id, None if anonymise else row.user_id, row.agent_id,
                   row.model)  # fmt: skip
            _add(totals, key, runs=1, estimated_runs=int(row.estimated),
                 latency_ms_sum=row.latency_ms or 0, latency_count=int(row.latency_ms is not None),
                 **{name: getattr(row, name) for name in RUN_SUMS})  # fmt: skip
        embedding_rows = list(embeddings.select_for_update().order_by("day", "id")[:limit])
        for row in embedding_rows:
            key = (row.day, row.project_id, None if anonymise else row.user_id, row.agent_id,
                   row.model)  # fmt: skip
            _add(totals, key, embedding_tokens=row.tokens)
        _store(totals)
        RunUsage.objects.filter(run_id__in=[r.run_id for r in run_rows]).delete()
        EmbeddingUsage.objects.filter(id__in=[r.id for r in embedding_rows]).delete()
    return {"run_usage": len(run_rows), "embedding_usage": len(embedding_rows)}


def usage_rollup_all(
    *, runs: QuerySet[RunUsage], embeddings: QuerySet[EmbeddingUsage], limit: int, **kw: Any
) -> dict[str, int]:
    """`usage_rollup_chunk` until nothing is left, each chunk its own transaction."""
    removed = {"run_usage": 0, "embedding_usage": 0}
    while True:
        done = usage_rollup_chunk(runs=runs, embeddings=embeddings, limit=limit, **kw)
        for name, count in done.items():
            removed[name] += count
        if not any(done.values()):
            return removed
