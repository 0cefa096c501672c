"""Logging filters for a terminal a person can read (`make run`) and logs that stay
useful in production."""

from __future__ import annotations

import json
import logging
import time

from celery import current_task

from common.tracing import LOG_CONTEXT, current_ids


class QuietTasks(logging.Filter):
    """Drops Celery's INFO lines ("received", "succeeded") of the given tasks: periodic
    maintenance would otherwise print a few lines every few seconds. Their failures are
    ERROR lines and still go through, as does whatever the tasks log themselves."""

    def __init__(self, tasks: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        args = record.args
        name = args.get("name") if isinstance(args, dict) else None
        if name is None and isinstance(args, tuple) and args:
            name = args[0]
        return name not in self.tasks


class ContextFilter(logging.Filter):
    """Adds to every record the ids of the work it belongs to: `trace_id` and `span_id`
    (tracing on), the Celery task's `task_id`, and what `common.tracing.log_context`
    set (`project_id`, `run_id`, ...); `context` joins them for the plain format
    (empty when there are none, so a line outside any work reads as before)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = dict(LOG_CONTEXT.get())
        trace_id, span_id = current_ids()
        if trace_id:
            ids["trace_id"], ids["span_id"] = trace_id, span_id
        task_id = _celery_task_id()
        if task_id:
            ids.setdefault("task_id", task_id)
        record.ids = ids
        for key in ("trace_id", "span_id", "task_id", "project_id", "run_id"):
            setattr(record, key, ids.get(key, ""))
        record.context = (
            " [" + " ".join(f"{k.removesuffix('_id')}={v}" for k, v in ids.items()) + "]"
            if ids
            else ""
        )
        return True


def _celery_task_id() -> str:
    task = current_task
    try:
        request = task.request if task else None
    except Exception:
        return ""
    return getattr(request, "id", None) or ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line (LOG_FORMAT=json): time, level, logger, message, the
    work's ids (see ContextFilter) and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        line.update(getattr(record, "ids", None) or {})
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        return time.strftime(datefmt or "%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
