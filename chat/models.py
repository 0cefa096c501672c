"""Chat sessions, their messages, and the runs that answer them (an agent's run on a
worker). Their tables keep the names they had in the agents app."""

import uuid

from django.db import models
from django.db.models import Q

from agents.models import Agent, AgentVersion
from projects.models import Project


class ChatSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="sessions")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="sessions")
    title = models.CharField(max_length=200, blank=True, default="")
    # A version of the agent the session keeps to (null: the agent as it is now).
    agent_version = models.ForeignKey(
        AgentVersion, on_delete=models.RESTRICT, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "agents_chatsession"  # moved from the agents app; the table stays
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["project", "-created_at"], name="session_project_created")]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        SYSTEM = "system"

    class Status(models.TextChoices):
        PENDING = "pending"
        STREAMING = "streaming"
        DONE = "done"
        ERROR = "error"
        CANCELLED = "cancelled"
        # Replaced by a regenerated answer: kept, but no longer part of the conversation.
        SUPERSEDED = "superseded"

    FINISHED = (Status.DONE, Status.ERROR, Status.CANCELLED)

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DONE)
    # Why a message ended in error; empty otherwise.
    error = models.TextField(blank=True, default="")
    # An answer's sources: the context chunks it was given or its tools found
    # ({"index", "id", "document_id", "source", "page", "section", "score"}).
    citations = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "agents_message"  # moved from the agents app; the table stays
        ordering = ["id"]
        indexes = [models.Index(fields=["session", "id"], name="message_session_id")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class Run(models.Model):
    """One agent run: producing one assistant message. The run is the chat path's outbox
    and its durable state: accepted with the message, dispatched after commit, claimed by
    one worker at a time under a lease the worker renews, and ended exactly once.

    `attempt` is the dispatch generation: each (re)dispatch carries it, only the task of
    the current generation may claim the run, and every write a worker makes is
    conditional on it, so a worker that lost its lease cannot touch the run any more.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        # Stored, holding no worker: for its owner's approval of a tool call, or for
        # the runs it asked of other agents (`suspended` says which); resumed on any
        # worker as a new attempt.
        WAITING = "waiting"
        DONE = "done"
        ERROR = "error"
        CANCELLED = "cancelled"

    FINISHED = (Status.DONE, Status.ERROR, Status.CANCELLED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="runs")
    message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="run")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="runs")
    # The version of the agent the run answers with (its session's pin, or the latest
    # when it was accepted); null for runs older than versions.
    agent_version = models.ForeignKey(
        AgentVersion, on_delete=models.RESTRICT, null=True, blank=True, related_name="+"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    # The bus's lane its attempts go on: a user's message is interactive, a scheduled one
    # bulk (served after interactive work, never starved: agentbus flow control).
    # The database's default too: a process of the previous release, still running during
    # an upgrade, stores runs without it.
    lane = models.CharField(
        max_length=16, choices=[("interactive", "interactive"), ("bulk", "bulk")],
        default="interactive", db_default="interactive",
    )  # fmt: skip
    attempt = models.PositiveIntegerField(default=1)
    # How many times a worker claimed it (bounded: a run that keeps losing its worker
    # ends in error).
    starts = models.PositiveIntegerField(default=0)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, default="")
    error = models.TextField(blank=True, default="")
    # The model the run asked (empty: not started yet).
    model = models.CharField(max_length=200, blank=True, default="")
    # What the run did, in order: one entry per provider turn and per tool call (see
    # chat.engine). Written by the worker as it goes, so a run restarted after
    # its worker died knows which tool calls were started.
    steps = models.JSONField(default=list, blank=True)
    # A run of an agent another agent's run asked (an agent tool): its caller, and how
    # deep in the tree of calls it is (0: answering a user).
    parent = models.ForeignKey(
        "self", on_delete=models.CASCADE, null=True, blank=True, related_name="children"
    )
    depth = models.PositiveSmallIntegerField(default=0)
    # A waiting run's stored state (chat.suspend): the conversation so far as sent to
    # the model, the step's calls, the results known, what it waits for. Kept while
    # the resumed run works, so a restart resumes from the same step.
    suspended = models.JSONField(null=True, blank=True)
    # A waiting run past this ends in error (the recovery pass).
    waiting_until = models.DateTimeField(null=True, blank=True)
    # The OpenTelemetry trace of the request that asked for it (32 hex digits; empty
    # with tracing off): the id an operator searches traces and logs by.
    trace_id = models.CharField(max_length=32, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # When its first text delta went out (time to first token: the dashboards' TTFT).
    first_token_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "agents_run"  # moved from the agents app; the table stays
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "lease_expires_at"], name="run_status_lease"),
            models.Index(fields=["status", "created_at"], name="run_status_created"),
            models.Index(fields=["session", "-created_at"], name="run_session_created"),
            # The admin's run list, newest first (100,000s of rows); the model beside it
            # lists the recent runs' models from the index alone (the model filter).
            models.Index(fields=["-created_at"], include=["model"], name="run_created_model"),
            # The admin's list of one model's runs, and its count.
            models.Index(fields=["model", "-created_at"], name="run_model_created"),
            # The admin's search by trace id (most runs have none: tracing is off).
            models.Index(fields=["trace_id"], condition=~Q(trace_id=""), name="run_trace"),
            # The per-minute rollup reads the runs that ended in a minute.
            models.Index(fields=["finished_at"], name="run_finished"),
        ]

    def __str__(self) -> str:
        return f"run {self.id} ({self.status})"


class WaitingRun(Run):
    """Runs waiting for their owner's approval of a tool call, as the admin lists them
    (with approve and reject actions): a view of `Run`, no table of its own."""

    class Meta:
        proxy = True
        verbose_name = "run waiting for approval"
        verbose_name_plural = "runs waiting for approval"
