from django.urls import path

from .apis import ProjectDetailApi, ProjectListCreateApi

urlpatterns = [
    path("", ProjectListCreateApi.as_view(), name="project-list"),
    path("<uuid:project_id>/", ProjectDetailApi.as_view(), name="project-detail"),
]
