from django.dispatch import Signal

# Sent inside the deleting transaction, after a project row is gone, whatever deleted
# it: `project_delete`, the admin, or a cascade (a user deleted). Receivers record
# their teardown work durably in the same transaction and act after commit.
# Arguments: project_id (UUID), user_id (int).
project_deleted = Signal()
