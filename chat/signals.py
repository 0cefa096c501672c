"""What the chat app announces to apps above it (automation's webhooks), which it must
not know."""

from django.dispatch import Signal

# Sent by chat.state inside the transaction that ends a run (or, for `waiting`, that
# parks it), once per transition: receivers record durable work (a webhook delivery) in
# that same transaction and act after commit, so an ended run never lacks its
# notification and a rolled-back end sends none.
# Arguments: run_id, project_id, user_id, session_id, message_id, agent_id (ids),
# status (`done`, `error`, `cancelled`, `waiting`), error (str).
run_transitioned = Signal()
