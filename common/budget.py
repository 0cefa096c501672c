"""A periodic task's own time limit.

Celery's time limits (CELERY_TASK_TIME_LIMIT / SOFT_TIME_LIMIT, a task's `time_limit`)
are not enforced in the thread pool the workers run (celery#9203). A maintenance task
whose work is a loop over rows, keys or queues takes a budget of its own instead: it
checks it between units of work (a safe point: nothing half done) and leaves the rest to
its next tick. Each tick does at least one unit, so a backlog always shrinks.
"""

from __future__ import annotations

import time


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.spent = False  # the work was cut short: the next tick goes on

    def over(self) -> bool:
        """Past the deadline (and remembered as `spent`)."""
        if not self.spent and time.monotonic() >= self.deadline:
            self.spent = True
        return self.spent

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())
