from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import EnvelopeListMixin, EnvelopePagination, StrictSerializer

from .selectors import project_get_for_user, project_list
from .services import project_create, project_delete, project_update


class ProjectOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()


class ProjectInputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(max_length=2000, allow_blank=True, required=False)


class ProjectListCreateApi(EnvelopeListMixin, APIView):
    pagination_class = EnvelopePagination.of("projects")

    @extend_schema(responses=ProjectOutputSerializer(many=True))
    def get(self, request):
        return self.list_response(project_list(user=request.user), ProjectOutputSerializer)

    @extend_schema(request=ProjectInputSerializer, responses={201: ProjectOutputSerializer})
    def post(self, request):
        data = ProjectInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        project = project_create(owner=request.user, **data.validated_data)
        return Response(ProjectOutputSerializer(project).data, status=status.HTTP_201_CREATED)


class ProjectDetailApi(APIView):
    @extend_schema(responses=ProjectOutputSerializer)
    def get(self, request, project_id):
        project = project_get_for_user(user=request.user, project_id=project_id)
        return Response(ProjectOutputSerializer(project).data)

    @extend_schema(request=ProjectInputSerializer, responses=ProjectOutputSerializer)
    def patch(self, request, project_id):
        project = project_get_for_user(user=request.user, project_id=project_id)
        data = ProjectInputSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        project = project_update(project=project, data=data.validated_data)
        return Response(ProjectOutputSerializer(project).data)

    @extend_schema(responses={204: None})
    def delete(self, request, project_id):
        project = project_get_for_user(user=request.user, project_id=project_id)
        project_delete(project=project)
        return Response(status=status.HTTP_204_NO_CONTENT)
