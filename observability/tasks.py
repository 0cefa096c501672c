"""The periodic rollup (beat, every OBSERVABILITY_ROLLUP_SECONDS)."""

from __future__ import annotations

from celery import shared_task

from .services import rollup_minutes


@shared_task(name="observability.rollup", ignore_result=True)
def rollup() -> int:
    return rollup_minutes()
