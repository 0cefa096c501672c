from django.dispatch import Signal

# Sent by projects.services.project_delete inside the deleting transaction, after the
# row is gone. Receivers (workspaces, agents) record and enqueue their teardown work.
# Arguments: project_id (UUID), user_id (int).
project_deleted = Signal()
