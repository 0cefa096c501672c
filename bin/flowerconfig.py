"""Flower's settings (Procfile: `celery -A config flower --conf=bin/flowerconfig.py`).

Flower runs inside the Django project (celery -A config), so it can say which project
a task belongs to: the Tasks page shows each task's queue, and next to a project queue
(`uws.project.<hex>`, the structural name workers and operators use) the project's name.
(The Broker page has no such hook: there the admin's Workspaces search finds a queue's
project by its id.)
"""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

PROJECT_QUEUE_PREFIX = "uws.project."
# AgentBus tasks carry their project among their keyword arguments (agentbus.publish),
# which task events report as a repr; the routing key is only in "sent" events (off).
_PROJECT_KWARG = re.compile(r"'project_id': '([0-9a-fA-F-]{36})'")
NAMES_TTL_SECONDS = 60

tasks_columns = "name,uuid,state,routing_key,received,runtime,worker"

# Flower serves pages on an asyncio loop, where Django refuses database calls: the
# lookups run on a thread of their own, and are cached.
_lookups = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flower-project-names")
_names: dict[str, tuple[float, str | None]] = {}


def _project_name(project_hex: str) -> str | None:
    # Here, not at the top: Flower runs this file as its options, and the models are
    # needed only when a page asks for a name.
    from projects.models import Project

    try:
        project_id = uuid.UUID(hex=project_hex)
    except ValueError:
        return None
    return Project.objects.filter(id=project_id).values_list("name", flat=True).first()


def project_name(queue: str) -> str | None:
    """The name of the project a queue belongs to (None: not a project queue, or gone)."""
    if not queue.startswith(PROJECT_QUEUE_PREFIX):
        return None
    project_hex = queue[len(PROJECT_QUEUE_PREFIX) :]
    cached = _names.get(project_hex)
    if cached and time.monotonic() - cached[0] < NAMES_TTL_SECONDS:
        return cached[1]
    try:
        name = _lookups.submit(_project_name, project_hex).result(timeout=5)
    except Exception:  # noqa: BLE001  (a label only: the page shows the queue without it)
        return None
    _names[project_hex] = (time.monotonic(), name)
    return name


def format_task(task):
    """The task's queue, with its project's name beside a project queue."""
    queue = getattr(task, "routing_key", None) or ""
    found = _PROJECT_KWARG.search(str(getattr(task, "kwargs", "") or ""))
    if not queue and found:
        queue = PROJECT_QUEUE_PREFIX + uuid.UUID(found.group(1)).hex
    name = project_name(queue)
    if name:
        task.routing_key = f"{queue} ({name})"
    elif queue:
        task.routing_key = queue
    return task


# Flower (2.2) lists the queues workers report (`inspect active_queues`) as of its last
# look at them: at start, and when someone opens /workers?refresh=1. Project queues are
# followed and retired as workspaces come and go, so it looks again every
# FLOWER_INSPECT_SECONDS on its own loop (one broadcast with replies per period).
def _refresh_workers_periodically() -> None:
    import os  # noqa: I001  (Flower runs this file as its options: kept self-contained)

    from flower.app import Flower
    from tornado.ioloop import PeriodicCallback

    seconds = float(os.environ.get("FLOWER_INSPECT_SECONDS", "10"))
    if seconds <= 0 or getattr(Flower.start, "_uws_periodic", False):
        return
    start = Flower.start

    def started(self):
        PeriodicCallback(self.update_workers, seconds * 1000).start()
        start(self)

    started._uws_periodic = True
    Flower.start = started


_refresh_workers_periodically()
