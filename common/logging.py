"""Logging filters for a terminal a person can read (`make run`) and logs that stay
useful in production."""

from __future__ import annotations

import logging


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
