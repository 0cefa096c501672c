"""The root page: where a newcomer finds the API, its docs, the admin and Flower."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "common/home.html", {"flower_url": settings.FLOWER_URL})
