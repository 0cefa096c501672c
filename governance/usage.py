"""Usage accounting: one `RunUsage` row per agent run (per assistant message).

The agents app calls, in order:

- `usage_admit` when a message is accepted, around the transaction that stores it: the
  quotas' admission (a 429 `QuotaExceeded` before anything is written), released again
  if the transaction fails;
- `usage_open` inside that transaction: the row, which makes the run count as in flight;
- `usage_meter_start` when the run is about to call its provider;
- `usage_record` when the run's answer is over, whatever its outcome: the tokens the
  provider reported (OpenAI-compatible endpoints, with `stream_options.include_usage`),
  or an estimate from the text where it reported none (`estimated`);
- `usage_run_finished` when the run ends (by its worker, a cancel or the recovery pass).

Each is idempotent: a run's tokens are counted once per dispatch attempt, its end once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db.models import F
from django.utils import timezone
from rest_framework import status
from rest_framework.exceptions import Throttled

from .models import RunUsage
from .quotas import Refusal, quota_admit, quota_charge, quota_release

logger = logging.getLogger(__name__)

OFFLINE = "offline"
# The usual rule of thumb for English text and OpenAI-style tokenizers.
CHARS_PER_TOKEN = 4
# Tokens a chat format adds per message (role, separators).
TOKENS_PER_MESSAGE = 4


class QuotaExceeded(Throttled):
    """A 429 naming the limit reached and when it resets (body keys beside the error
    shape's `detail` and `code`; `Retry-After` in seconds)."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "quota_exceeded"

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(wait=refusal.retry_after, detail=refusal.detail, code="quota_exceeded")
        self.body_extra = {
            "scope": refusal.scope,
            "limit": refusal.limit,
            "limit_value": refusal.limit_value,
            "used": refusal.used,
            "resets_at": refusal.resets_at.isoformat() if refusal.resets_at else None,
        }


@contextlib.contextmanager
def usage_admit(*, project_id, user_id) -> Iterator[uuid.UUID]:
    """Admit a new run against the quotas; yields the id the run must be stored under.
    Raises QuotaExceeded (nothing stored yet) when a limit is reached; releases the
    admission if the block fails."""
    run_id = uuid.uuid4()
    refusal = quota_admit(project_id=project_id, user_id=user_id, run_id=run_id)
    if refusal is not None:
        raise QuotaExceeded(refusal)
    try:
        yield run_id
    except BaseException:
        quota_release(project_id=project_id, user_id=user_id, run_id=run_id)
        raise


def usage_open(*, run_id, project_id, user_id, agent_id, message_id) -> None:
    """The run's accounting row, in the transaction that stores the run."""
    now = timezone.now()
    RunUsage.objects.create(
        run_id=run_id,
        project_id=project_id,
        user_id=user_id,
        agent_id=agent_id,
        message_id=message_id,
        day=now.date(),
        created_at=now,
    )


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


@dataclass
class UsageMeter:
    """What one provider call of a run needs to be accounted: the provider (which may
    carry `usage` once it streamed), the model asked, the prompt, when it started."""

    provider: Any
    model: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def measure(self, completion: str) -> dict[str, Any]:
        reported = getattr(self.provider, "usage", None)
        prompt = getattr(reported, "prompt_tokens", None)
        done = getattr(reported, "completion_tokens", None)
        estimated = prompt is None or done is None
        if estimated:
            prompt = sum(
                estimate_tokens(str(m.get("content") or "")) + TOKENS_PER_MESSAGE
                for m in self.messages
            )
            done = estimate_tokens(completion)
        return {
            "prompt_tokens": int(prompt),
            "completion_tokens": int(done),
            "estimated": estimated,
            "latency_ms": int((time.monotonic() - self.started) * 1000),
            "model": getattr(self.provider, "usage_model", None) or self.model,
            "provider": getattr(self.provider, "name", ""),
        }


def usage_meter_start(*, provider, model: str, messages: list[dict[str, Any]]) -> UsageMeter:
    if not model:  # what the provider will ask for instead
        model = OFFLINE if getattr(provider, "name", "") == OFFLINE else settings.LLM_DEFAULT_MODEL
    return UsageMeter(provider=provider, model=model, messages=list(messages))


def _never_raises(function):
    """Accounting must not fail a run that already answered: failures are logged (the
    run's row stays open; the next rebuild of the counters reads the database)."""

    @functools.wraps(function)
    def wrapper(**kwargs):
        try:
            return function(**kwargs)
        except Exception:
            logger.exception("%s failed for run %s", function.__name__, kwargs.get("run_id"))
            return None

    return wrapper


@_never_raises
def usage_record(
    *,
    run_id,
    attempt: int,
    project_id,
    user_id,
    agent_id,
    message_id,
    meter: UsageMeter | None,
    completion: str,
    outcome: str,
) -> bool:
    """Record what dispatch `attempt` of the run cost: True when this call counted it
    (each attempt once; a run that never reached its provider costs nothing)."""
    measured = (
        meter.measure(completion)
        if meter is not None
        else {"prompt_tokens": 0, "completion_tokens": 0, "estimated": False, "latency_ms": None}
    )
    tokens = measured["prompt_tokens"] + measured["completion_tokens"]
    row = RunUsage.objects.filter(run_id=run_id).values("day").first()
    if row is None:  # a run stored without its row (before accounting existed)
        usage_open(
            run_id=run_id,
            project_id=project_id,
            user_id=user_id,
            agent_id=agent_id,
            message_id=message_id,
        )
        row = {"day": timezone.now().date()}
    changes: dict[str, Any] = {
        "prompt_tokens": F("prompt_tokens") + measured["prompt_tokens"],
        "completion_tokens": F("completion_tokens") + measured["completion_tokens"],
        "total_tokens": F("total_tokens") + tokens,
        "latency_ms": measured["latency_ms"],
        "outcome": outcome,
        "recorded_attempt": attempt,
        "recorded_at": timezone.now(),
    }
    if measured["estimated"]:
        changes["estimated"] = True
    if meter is not None:
        changes["model"] = measured["model"][:200]
        changes["provider"] = measured["provider"][:50]
    counted = RunUsage.objects.filter(run_id=run_id, recorded_attempt__lt=attempt).update(**changes)
    if counted:
        quota_charge(project_id=project_id, user_id=user_id, day=row["day"], tokens=tokens)
    return bool(counted)


@_never_raises
def usage_run_finished(*, run_id, project_id, user_id) -> None:
    """The run ended: it no longer counts as in flight."""
    RunUsage.objects.filter(run_id=run_id, finished_at__isnull=True).update(
        finished_at=timezone.now()
    )
    quota_release(project_id=project_id, user_id=user_id, run_id=run_id)
