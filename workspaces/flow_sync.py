"""Projects' flow rules written again into the bus's Redis from the database.

The rules live in two places: the database (the Project row, what operators set) and
the bus's Redis (what the workers' take reads, agentbus.flow). A save writes both
(`project_flow_changed` -> `flow_rules_set`); a Redis that lost its data (a restart
without persistence, a failover, a flush) would serve every project with the defaults
until each was saved again. The periodic `workspaces.flow_rules_resync` (beat, every
FLOW_RULES_RESYNC_SECONDS) compares the two and writes what differs, compare-and-set per
queue, so a save racing the re-sync keeps the newer rules.
"""

from __future__ import annotations

import logging
import uuid

from django.db.models import Q

from agentbus.flow import flow_rules_stored, flow_rules_sync, flow_rules_value
from projects.models import Project

logger = logging.getLogger(__name__)


def flow_rules_resync() -> int:
    """Write the rules the database holds where the bus reads them; drop what the bus
    holds for projects whose rules are the defaults (or that are gone). Returns how many
    projects' rules were written. One read of the rules, one query of the projects with
    rules of their own, one script per 500 differences."""
    stored = flow_rules_stored()  # first: a save after this read is kept (see flow_rules_sync)
    wanted: dict[uuid.UUID, str] = {}
    rows = (
        Project.objects.filter(Q(flow_weight__isnull=False) | Q(flow_max_in_flight__gt=0))
        .values_list("id", "flow_weight", "flow_max_in_flight")
        .iterator(chunk_size=2000)
    )
    for project_id, weight, cap in rows:
        try:
            value = flow_rules_value(weight=weight, max_in_flight=cap)
        except ValueError:
            logger.warning("project %s: flow rules out of bounds, left as stored", project_id)
            continue
        if value is not None:
            wanted[project_id] = value
    written = flow_rules_sync(stored=stored, wanted=wanted)
    if written:
        logger.warning("flow rules of %d project(s) written again from the database", written)
    return written
