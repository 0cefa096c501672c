"""Read helpers every app's selectors share."""

from django.db.models import QuerySet
from django.http import Http404


def get_or_404(queryset: QuerySet, **lookup):
    """The one row of `queryset` matching `lookup`; Http404 when none (or the lookup is
    malformed, e.g. not a UUID)."""
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError):
        raise Http404(f"No such {queryset.model._meta.verbose_name}.") from None
