"""What the catalogue announces to the apps above it, which it must not know."""

from django.dispatch import Signal

# Sent once an agent's deletion committed, with `user_id`, `project_id`, `agent_id`:
# its context (context.receivers) goes too. Receivers enqueue idempotent work; if one is
# lost, the collections sweep finds what was left behind.
agent_deleted = Signal()
