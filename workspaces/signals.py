"""Signals through which workspaces tell other apps about their agents and teardown.

Receivers must be idempotent: a workspace may be initialised again (after a Redis
flush or a reset) and a teardown may run more than once.
"""

from django.dispatch import Signal

# Sent after agents are registered on the AgentBus (workspace initialisation, an agent
# added). Arguments: user_id (int), project_id (UUID), agent_ids (list[str]).
agents_registered = Signal()

# Sent after an agent is deregistered because it was deleted.
# Arguments: user_id (int), project_id (UUID), agent_id (str).
agent_deregistered = Signal()

# Sent by the teardown task on a worker, after the workspace's queue is retired and its
# Redis keys removed. Receivers run synchronously and RAISE on failure: the task then
# retries with backoff. Arguments: user_id (int), project_id (UUID).
workspace_teardown = Signal()
