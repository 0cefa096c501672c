"""Signals through which workspaces tell other apps about their lifecycle.

Receivers must be idempotent: a teardown may run more than once.
"""

from django.dispatch import Signal

# Sent by the teardown task on a worker, after the workspace's queue is retired and its
# Redis keys removed. Receivers run synchronously and RAISE on failure: the task then
# retries with backoff. Arguments: user_id (int), project_id (UUID).
workspace_teardown = Signal()
