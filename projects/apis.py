"""The user's projects: list, create, read, rename, delete (with its whole workspace)."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer, TextField

from .selectors import project_get_for_user, project_list
from .services import project_create, project_delete, project_update


class ProjectOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    weight = serializers.IntegerField(
        source="effective_weight",
        read_only=True,
        help_text="The project's share of the shared workers under contention, against "
        "other projects' weights. Set by operators.",
    )
    max_in_flight = serializers.IntegerField(
        source="flow_max_in_flight",
        read_only=True,
        help_text="At most this many of the project's tasks run at once (0: no cap). Set "
        "by operators.",
    )

    class Meta:
        ref_name = "Project"


class ProjectInputSerializer(StrictSerializer):
    name = TextField(max_length=200)
    description = TextField(max_length=2000, allow_blank=True, required=False)

    class Meta:
        ref_name = "ProjectInput"


@extend_schema(tags=["Projects"])
class ProjectListCreateApi(EnvelopeListMixin, APIView):
    pagination_class = EnvelopePagination.of("projects")
    # A project API key lists its own project; it cannot create one.
    credential_scopes = {"GET": "read", "POST": None}

    @extend_schema(
        operation_id="projects_list",
        summary="List your projects",
        description="Your projects, newest first.",
        responses={200: ProjectOutputSerializer(many=True)},
    )
    def get(self, request):
        return self.list_response(
            project_list(user=request.user, credential=request.auth), ProjectOutputSerializer
        )

    @extend_schema(
        operation_id="projects_create",
        summary="Create a project",
        description="A project is the unit of isolation: its agents, chats, queue and "
        "context memory are its own. Its workspace starts on its first agent or message.",
        request=ProjectInputSerializer,
        responses={201: ProjectOutputSerializer},
    )
    def post(self, request):
        data = ProjectInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = project_create(owner=request.user, **data.validated_data)
        return Response(ProjectOutputSerializer(project).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["Projects"])
class ProjectDetailApi(APIView):
    # Deleting a project takes the owner's own credentials (token or session): a
    # project API key, whatever its scopes, is a 403, so a leaked `write` key cannot
    # destroy the project it was made for.
    credential_scopes = {"DELETE": None}

    @extend_schema(
        operation_id="projects_retrieve",
        summary="Get a project",
        responses={200: ProjectOutputSerializer},
    )
    def get(self, request, project_id):
        project = project_get_for_user(
            user=request.user, project_id=project_id, credential=request.auth
        )
        return Response(ProjectOutputSerializer(project).data)

    @extend_schema(
        operation_id="projects_update",
        summary="Rename or describe a project",
        description="Changes only the fields given.",
        request=ProjectInputSerializer(partial=True),
        responses={200: ProjectOutputSerializer},
    )
    def patch(self, request, project_id):
        project = project_get_for_user(
            user=request.user, project_id=project_id, credential=request.auth
        )
        data = ProjectInputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        project = project_update(project=project, data=data.validated_data)
        return Response(ProjectOutputSerializer(project).data)

    @extend_schema(
        operation_id="projects_destroy",
        summary="Delete a project and everything in it",
        description="Deletes the project's agents, chats and messages, and tears down its "
        "workspace: queue, cached state, event streams and context memory. Open event "
        "streams end with `stream.closed`. Needs the owner's own credentials: a project "
        "API key, whatever its scopes, is refused (403).",
        responses={204: None},
    )
    def delete(self, request, project_id):
        project = project_get_for_user(
            user=request.user, project_id=project_id, credential=request.auth
        )
        project_delete(project=project)
        return Response(status=status.HTTP_204_NO_CONTENT)
