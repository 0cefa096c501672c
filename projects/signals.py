from django.dispatch import Signal

# Sent inside the deleting transaction, after a project row is gone, whatever deleted
# it: `project_delete`, the admin, or a cascade (a user deleted). Receivers record
# their teardown work durably in the same transaction and act after commit.
# Arguments: project_id (UUID), user_id (int).
project_deleted = Signal()

# Sent after commit when a project's flow rules (weight, max in flight) changed, so the
# app that talks to the bus stores them where the workers read them. Arguments:
# project_id (UUID), weight (int or None: the default), max_in_flight (int, 0: no cap).
project_flow_changed = Signal()
