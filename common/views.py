"""The root page (where a newcomer finds the API, its docs, the admin and Flower) and
the ReDoc page."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularRedocView


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "common/home.html", {"flower_url": settings.FLOWER_URL})


class RedocView(SpectacularRedocView):
    """ReDoc, entirely from this server: drf-spectacular's page without its web fonts,
    and a policy that keeps ReDoc's own attribution logo (a CDN image it hides when it
    cannot load) from being fetched, so the docs make no request off the machine."""

    template_name = "common/redoc.html"

    @extend_schema(exclude=True)
    def get(self, request, *args, **kwargs):
        response = super().get(request, *args, **kwargs)
        response["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; font-src 'self' data:"
        )
        return response
