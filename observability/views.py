"""Dashboards in the admin (staff): the deployment's and one project's charts over the
last hours, drawn in the browser by Chart.js served from this app's static files, from
the per-minute rollups (observability.selectors): one indexed query per page."""

from __future__ import annotations

import uuid

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import Http404
from django.shortcuts import render

from projects.models import Project

from .selectors import dashboard_series

HOURS = (1, 6, 24, 72)


def _hours(request) -> int:
    try:
        hours = int(request.GET.get("hours", 6))
    except ValueError:
        return 6
    return hours if hours in HOURS else 6


def _page(request, *, title: str, project: Project | None):
    hours = _hours(request)
    context = {
        **admin.site.each_context(request),
        "title": title,
        "project": project,
        "hours": hours,
        "hour_choices": HOURS,
        "series": dashboard_series(project_id=project.id if project else None, hours=hours),
        "projects": Project.objects.order_by("name").values("id", "name")[:200],
    }
    return render(request, "admin/observability/dashboard.html", context)


@staff_member_required
def deployment_dashboard(request):
    return _page(request, title="Deployment dashboard", project=None)


@staff_member_required
def project_dashboard(request, project_id: uuid.UUID):
    project = Project.objects.filter(id=project_id).select_related("owner").first()
    if project is None:
        raise Http404("No such project.")
    return _page(request, title=f"Dashboard of project {project.name}", project=project)
