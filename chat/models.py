"""Chat sessions, their messages, and the runs that answer them (an agent's run on a
worker). Their tables keep the names they had in the agents app."""

import uuid

from django.db import models

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
    created_at = models.DateTimeField(auto_now_add=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "agents_run"  # moved from the agents app; the table stays
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "lease_expires_at"], name="run_status_lease"),
            models.Index(fields=["status", "created_at"], name="run_status_created"),
            models.Index(fields=["session", "-created_at"], name="run_session_created"),
        ]

    def __str__(self) -> str:
        return f"run {self.id} ({self.status})"
