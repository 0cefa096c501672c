"""Usage accounting: one `RunUsage` row per agent run that reached its provider.

The chat app calls:

- `usage_admit` when a message is accepted, around the transaction that stores it: the
  quotas' admission (a 429 `QuotaExceeded` before anything is written), released again
  if the transaction fails;
- `usage_meter_add` each time the run is about to call its provider (a run with tools
  calls it once per step; the meter sums them, and counts the tool calls asked for);
- `usage_record` when the run's answer is over, whatever its outcome: the tokens the
  provider reported (OpenAI-compatible endpoints, with `stream_options.include_usage`),
  or an estimate from the text where it reported none (`estimated`). Counted once per
  dispatch attempt (an attempt is claimed by one worker; a duplicate is refused). A run
  its worker ends writes the row (`usage_row_write`) in the transaction that ends it,
  and charges the quotas (`usage_charge`) after commit: no finished run lacks its row;
- `usage_run_ended` when the run ends (by its worker, a cancel or the recovery pass):
  it no longer counts as in flight;
- `embedding_usage_record` when an ingest job stored a batch of documents (embedding
  tokens are accounted, not held against quotas).
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
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework import status
from rest_framework.exceptions import Throttled

from .models import EmbeddingUsage, RunUsage
from .quotas import Refusal, quota_admit, quota_charge, quota_release

logger = logging.getLogger(__name__)

OFFLINE = "offline"
# Outcomes of an answer (chat.engine.Answer) after which the run does not run on.
ENDED = ("done", "error", "cancelled", "project-deleted")
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
    Raises QuotaExceeded (nothing stored yet) when a limit is reached, QuotaUnavailable
    (a 503) when a quota applies but Redis is down; releases the
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


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


@dataclass
class ProviderCall:
    """One provider call: the provider (which carries `usage` once it streamed, when it
    reports any), the model asked and the prompt."""

    provider: Any
    model: str
    messages: list[dict[str, Any]]

    @property
    def reached(self) -> bool:
        """Whether the provider accepted the call (a provider that cannot be refused,
        such as the offline one, has no `reached` and always did)."""
        return bool(getattr(self.provider, "reached", True))


@dataclass
class UsageMeter:
    """What one attempt of a run needs to be accounted: its provider calls (one per step
    of a tool loop), the tool calls the model asked for, when the first call started."""

    calls: list[ProviderCall] = field(default_factory=list)
    tool_calls: int = 0
    started: float = field(default_factory=time.monotonic)
    # Set by usage_record once the run left the in-flight set.
    released: bool = False

    @property
    def reached(self) -> list[ProviderCall]:
        """The calls that reached their provider: only these cost anything (a connection
        refused, a 404 or a 400 ran no model)."""
        return [call for call in self.calls if call.reached]

    def measure(self, completion: str) -> dict[str, Any]:
        """The tokens the provider reported for every call that reached it; where any
        reported none, all of them estimated from the text (prompts, and the answer's)."""
        calls = self.reached
        reported = [getattr(call.provider, "usage", None) for call in calls]
        estimated = any(
            getattr(usage, "prompt_tokens", None) is None
            or getattr(usage, "completion_tokens", None) is None
            for usage in reported
        )
        if estimated:
            prompt = sum(
                estimate_tokens(str(m.get("content") or "")) + TOKENS_PER_MESSAGE
                for call in calls
                for m in call.messages
            )
            done = estimate_tokens(completion)
        else:
            prompt = sum(int(usage.prompt_tokens) for usage in reported)
            done = sum(int(usage.completion_tokens) for usage in reported)
        first = calls[0] if calls else ProviderCall(None, "", [])
        return {
            "prompt_tokens": int(prompt),
            "completion_tokens": int(done),
            "estimated": estimated,
            "tool_calls": self.tool_calls,
            "latency_ms": int((time.monotonic() - self.started) * 1000),
            "model": getattr(first.provider, "usage_model", None) or first.model,
            "provider": getattr(first.provider, "name", ""),
        }


def usage_meter_add(
    meter: UsageMeter | None, *, provider, model: str, messages: list[dict[str, Any]]
) -> UsageMeter:
    """The run's meter (a new one if None) with one more provider call on it."""
    if not model:  # what the provider will ask for instead
        model = OFFLINE if getattr(provider, "name", "") == OFFLINE else settings.LLM_DEFAULT_MODEL
    meter = meter if meter is not None else UsageMeter()
    meter.calls.append(ProviderCall(provider=provider, model=model, messages=list(messages)))
    return meter


def usage_meter_start(*, provider, model: str, messages: list[dict[str, Any]]) -> UsageMeter:
    """A meter for a run's first provider call."""
    return usage_meter_add(None, provider=provider, model=model, messages=messages)


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
    accepted_at: datetime,
    meter: UsageMeter | None,
    completion: str,
    outcome: str,
) -> bool:
    """Record what dispatch `attempt` of the run cost: True when this call counted it.
    A run that never reached its provider (no meter, or no call the provider accepted)
    costs nothing and gets no row; it leaves the in-flight set when it ends
    (usage_run_ended).
    (A run's worker ending it uses `usage_row_write` inside the transaction that ends
    it, then `usage_charge`.)"""
    tokens = usage_row_write(
        run_id=run_id,
        attempt=attempt,
        project_id=project_id,
        user_id=user_id,
        agent_id=agent_id,
        message_id=message_id,
        accepted_at=accepted_at,
        meter=meter,
        completion=completion,
        outcome=outcome,
    )
    if tokens is None:
        return False
    usage_charge(
        run_id=run_id,
        project_id=project_id,
        user_id=user_id,
        accepted_at=accepted_at,
        meter=meter,
        tokens=tokens,
        outcome=outcome,
    )
    return True


def usage_row_write(
    *,
    run_id,
    attempt: int,
    project_id,
    user_id,
    agent_id,
    message_id,
    accepted_at: datetime,
    meter: UsageMeter | None,
    completion: str,
    outcome: str,
) -> int | None:
    """The database half of `usage_record`: the run's usage row for dispatch `attempt`
    (added to an earlier attempt's row). Returns the tokens counted, or None when there
    is nothing to count (no provider call) or this attempt was counted already. Raises
    on a database error: called inside the transaction that ends the run, so that a run
    never ends without its usage (nor the other way round)."""
    if meter is None or not meter.reached:
        return None
    measured = meter.measure(completion)
    tokens = measured["prompt_tokens"] + measured["completion_tokens"]
    fields = {
        "latency_ms": measured["latency_ms"],
        "outcome": outcome[:32],
        "recorded_attempt": attempt,
        "recorded_at": timezone.now(),
        "model": measured["model"][:200],
        "provider": measured["provider"][:50],
    }
    counted = 0
    if attempt > 1:  # an earlier attempt may have its row: add to it
        added = {
            "prompt_tokens": F("prompt_tokens") + measured["prompt_tokens"],
            "completion_tokens": F("completion_tokens") + measured["completion_tokens"],
            "total_tokens": F("total_tokens") + tokens,
            "tool_calls": F("tool_calls") + measured["tool_calls"],
            **({"estimated": True} if measured["estimated"] else {}),
        }
        counted = RunUsage.objects.filter(run_id=run_id, recorded_attempt__lt=attempt).update(
            **fields, **added
        )
    if not counted:
        # A savepoint only inside a caller's transaction; a worker's run is in autocommit,
        # where the failed insert needs none (and a savepoint would cost round trips).
        guard = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
        try:
            with guard:
                RunUsage.objects.create(
                    run_id=run_id,
                    project_id=project_id,
                    user_id=user_id,
                    agent_id=agent_id,
                    message_id=message_id,
                    prompt_tokens=measured["prompt_tokens"],
                    completion_tokens=measured["completion_tokens"],
                    total_tokens=tokens,
                    tool_calls=measured["tool_calls"],
                    estimated=measured["estimated"],
                    day=accepted_at.astimezone(UTC).date(),
                    created_at=accepted_at,
                    **fields,
                )
        except IntegrityError:
            return None  # this attempt was recorded already
    return tokens


@_never_raises
def usage_charge(
    *,
    run_id,
    project_id,
    user_id,
    accepted_at: datetime,
    meter: UsageMeter,
    tokens: int,
    outcome: str,
) -> None:
    """The Redis half of `usage_record`, after the row is committed: the quotas' counters
    are charged the tokens."""
    # The provider call is over: an answer that ended here leaves the in-flight set now,
    # in the same round trip (one the recovery pass takes over stays in it).
    released = outcome in ENDED
    quota_charge(
        project_id=project_id,
        user_id=user_id,
        day=accepted_at.astimezone(UTC).date(),
        tokens=tokens,
        release_run_id=run_id if released else None,
    )
    meter.released = released


@_never_raises
def usage_run_ended(*, run_id, project_id, user_id, meter: UsageMeter | None = None) -> None:
    """The run ended: it no longer counts as in flight (unless `usage_record` released
    it already, with the run's `meter`)."""
    if meter is not None and meter.released:
        return
    quota_release(project_id=project_id, user_id=user_id, run_id=run_id)


@_never_raises
def embedding_usage_record(
    *, project_id, user_id, agent_id, job_id: str, batch_start: int, texts: list[str], model: str
) -> None:
    """Count the tokens one stored batch of an ingest job embedded (estimated from its
    text); a batch delivered again is counted once."""
    now = timezone.now()
    EmbeddingUsage.objects.bulk_create(
        [
            EmbeddingUsage(
                project_id=project_id,
                user_id=user_id,
                agent_id=agent_id,
                job_id=str(job_id)[:64],
                batch_start=batch_start,
                model=model[:200],
                tokens=sum(estimate_tokens(text) for text in texts),
                day=now.astimezone(UTC).date(),
                created_at=now,
            )
        ],
        ignore_conflicts=True,
    )
