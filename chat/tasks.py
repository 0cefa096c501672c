"""Chat tasks: a run answered on a worker (from the project's AgentBus queue) and the
recovery pass (beat).

Each task is thin (ids and JSON in, one service called) and idempotent: a redelivered
task, or one whose rows are gone, ends without harm. `AgentBusTask` skips any task of a
deleted project before it runs. Task names keep the `agents.` prefix they were
published under, so messages already queued still find their task.
"""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from agentbus import AgentBusTask
from common.budget import Budget

from .dispatch import RUN_TASK, run_next_dispatch_after, runs_recover
from .engine import AgentRunFailed, chat_run
from .suspend import caller_resume_after, runs_waiting_recover


@shared_task(base=AgentBusTask, bind=True, name=RUN_TASK, throws=(AgentRunFailed,))
def run_agent(self, *, user_id: int, project_id: str, run_id: str, attempt: int) -> str:
    # A run that ends in error raises AgentRunFailed: a failed task in Flower (`throws`:
    # logged without a traceback, the run already says why). Never retried by Celery:
    # the recovery pass owns retries.
    try:
        return chat_run(run_id=run_id, attempt=attempt)
    finally:
        ended = run_next_dispatch_after(run_id=run_id)
        if ended is not None:
            # An agent's answer another agent's run waits for (stored: chat.suspend).
            caller_resume_after(child_run_id=run_id, parent_id=ended.parent_id)


@shared_task(name="agents.recover_runs", ignore_result=True)
def recover_runs() -> dict:
    """Beat: dispatch again the runs that were lost (see chat.dispatch); end the waiting
    runs past their deadline and resume the callers whose agents all answered
    (chat.suspend)."""
    # One budget for the whole pass, its interval (Celery's limits are not enforced in
    # the thread pool): the waiting runs get what the lost ones left, at least one each.
    budget = Budget(settings.RUN_RECOVERY_SECONDS)
    done = runs_recover(budget=budget.left())
    return {**done, **runs_waiting_recover(budget=budget.left())}
