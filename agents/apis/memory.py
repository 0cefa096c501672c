"""An agent's memory blocks: named blocks always in its system prompt (agents.memory)."""

from __future__ import annotations

from django.conf import settings
from django.db import IntegrityError
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from common.api import (
    Conflict,
    EnvelopeListMixin,
    EnvelopePagination,
    IntegerInputField,
    StrictSerializer,
    TextField,
)
from common.schema import error_responses
from projects.mixins import ProjectScopedApi

from ..memory import memory_block_create, memory_block_delete, memory_block_update
from ..selectors import (
    agent_get,
    memory_block_get,
    memory_block_list,
    memory_change_list,
)

LABEL_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
# A label in a block's path: "changes" is reserved (…/memory/changes/ is the audit trail).
BLOCK_LABEL_PATTERN = r"^(?!changes$)[a-z][a-z0-9_]{0,63}$"
MAX_DESCRIPTION_CHARS = 2000


class MemoryBlockOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    label = serializers.CharField()
    value = serializers.CharField()
    limit = serializers.IntegerField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    class Meta:
        ref_name = "MemoryBlock"


class MemoryBlockInputSerializer(StrictSerializer):
    label = serializers.RegexField(
        LABEL_PATTERN,
        help_text="Lower-case letters, digits and '_', starting with a letter; at most 64. "
        "The agent's tools name the block by it.",
    )
    value = TextField(
        allow_blank=True, required=False, default="",
        help_text="What the block holds, verbatim in the system prompt; at most `limit` "
        "characters.",
    )  # fmt: skip
    limit = IntegerInputField(
        min_value=1, max_value=settings.MEMORY_BLOCK_MAX_CHARS, required=False, default=2000,
        help_text="The most characters the value may hold (MEMORY_BLOCK_MAX_CHARS at most).",
    )  # fmt: skip
    description = TextField(
        allow_blank=True, required=False, default="", max_length=MAX_DESCRIPTION_CHARS,
        help_text="What the block is for (the agent reads it beside the value).",
    )  # fmt: skip

    class Meta:
        ref_name = "MemoryBlockInput"

    def validate_label(self, value: str) -> str:
        if value == "changes":  # …/memory/changes/ is the audit trail's route
            raise serializers.ValidationError("'changes' is reserved.")
        return value

    def validate_limit(self, value: int) -> int:
        if value > settings.MEMORY_BLOCK_MAX_CHARS:
            raise serializers.ValidationError(f"Must be at most {settings.MEMORY_BLOCK_MAX_CHARS}.")
        return value

    def validate(self, attrs):
        attrs = super().validate(attrs)
        current = getattr(self, "current", None)
        limit = attrs.get("limit", current.limit if current else 2000)
        value = attrs.get("value", current.value if current else "")
        if len(value) > limit:
            raise serializers.ValidationError(
                {"value": [f"Holds {len(value)} characters; the limit is {limit}."]}
            )
        return attrs


class MemoryBlockUpdateSerializer(MemoryBlockInputSerializer):
    """A change of a block: its fields but the label, which never changes (it names the
    block in the path)."""

    label = None

    class Meta:
        ref_name = "MemoryBlockUpdate"


class MemoryChangeOutputSerializer(serializers.Serializer):
    label = serializers.CharField()
    action = serializers.ChoiceField(choices=("create", "update", "delete", "append", "replace"))
    actor = serializers.ChoiceField(choices=("owner", "admin", "agent"))
    run_id = serializers.UUIDField(allow_null=True)
    before = serializers.CharField()
    after = serializers.CharField()
    created_at = serializers.DateTimeField()

    class Meta:
        ref_name = "MemoryChange"


_CONFLICT = error_responses(409, _409="The agent has a memory block with this label.")


def _label_taken() -> Conflict:
    return Conflict({"label": ["The agent has a memory block with this label."]})


@extend_schema(tags=["Memory"])
class MemoryBlockListCreateApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("blocks")

    @extend_schema(
        operation_id="memory_blocks_list",
        summary="List an agent's memory blocks",
        description="Oldest first; every block is in the agent's system prompt.",
        responses={200: MemoryBlockOutputSerializer(many=True)},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return self.list_response(memory_block_list(agent=agent), MemoryBlockOutputSerializer)

    @extend_schema(
        operation_id="memory_blocks_create",
        summary="Give an agent a memory block",
        description="At most MEMORY_BLOCKS_PER_AGENT blocks; a value longer than its "
        "limit is a 400. Audited (…/memory/changes/).",
        request=MemoryBlockInputSerializer,
        responses={201: MemoryBlockOutputSerializer, **_CONFLICT},
    )
    def post(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        data = MemoryBlockInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        blocks = memory_block_list(agent=agent)
        if blocks.filter(label=data.validated_data["label"]).exists():
            raise _label_taken()
        if blocks.count() >= settings.MEMORY_BLOCKS_PER_AGENT:
            raise serializers.ValidationError(
                {"label": [f"The agent has {settings.MEMORY_BLOCKS_PER_AGENT} blocks, the most."]}
            )
        try:
            block = memory_block_create(agent=agent, data=data.validated_data)
        except IntegrityError:
            raise _label_taken() from None
        return Response(MemoryBlockOutputSerializer(block).data, status=status.HTTP_201_CREATED)


@extend_schema(
    tags=["Memory"],
    parameters=[
        OpenApiParameter(
            "label",
            str,
            OpenApiParameter.PATH,
            pattern=BLOCK_LABEL_PATTERN,
            description="The block's label; one no block can have is a 404.",
        )
    ],
)
class MemoryBlockDetailApi(ProjectScopedApi):
    def _block(self, agent_id, label):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return memory_block_get(agent=agent, label=label)

    @extend_schema(
        operation_id="memory_blocks_retrieve",
        summary="Get a memory block",
        responses={200: MemoryBlockOutputSerializer},
    )
    def get(self, request, project_id, agent_id, label):
        return Response(MemoryBlockOutputSerializer(self._block(agent_id, label)).data)

    @extend_schema(
        operation_id="memory_blocks_update",
        summary="Change a memory block",
        description="Changes only the fields given; the label never changes (it is not "
        "a field here). The value must fit "
        "the limit. Audited.",
        request=MemoryBlockUpdateSerializer,
        responses={200: MemoryBlockOutputSerializer},
    )
    def patch(self, request, project_id, agent_id, label):
        block = self._block(agent_id, label)
        data = MemoryBlockUpdateSerializer(data=request.data, partial=True)
        data.current = block
        data.is_valid(raise_exception=True)
        block = memory_block_update(block=block, data=data.validated_data)
        return Response(MemoryBlockOutputSerializer(block).data)

    @extend_schema(
        operation_id="memory_blocks_destroy",
        summary="Delete a memory block",
        responses={204: None},
    )
    def delete(self, request, project_id, agent_id, label):
        memory_block_delete(block=self._block(agent_id, label))
        return Response(status=status.HTTP_204_NO_CONTENT)


@extend_schema(tags=["Memory"])
class MemoryChangeListApi(EnvelopeListMixin, ProjectScopedApi):
    pagination_class = EnvelopePagination.of("changes")

    @extend_schema(
        operation_id="memory_changes_list",
        summary="List the changes of an agent's memory blocks",
        description="Newest first: by the owner (API), an admin, or the agent (its tools).",
        responses={200: MemoryChangeOutputSerializer(many=True)},
    )
    def get(self, request, project_id, agent_id):
        agent = agent_get(project=self.project, agent_id=agent_id)
        return self.list_response(memory_change_list(agent=agent), MemoryChangeOutputSerializer)
