"""Field validators shared by the API's serializers and the models (so the admin's forms
check exactly what the API checks). They raise Django's ValidationError, which DRF turns
into a 400 naming the field."""

from __future__ import annotations

from django.core.exceptions import ValidationError

MAX_TEXT_BYTES = 32 * 1024


def validate_text_size(value: str) -> None:
    if len(value.encode("utf-8", errors="surrogatepass")) > MAX_TEXT_BYTES:
        raise ValidationError(f"Must be at most {MAX_TEXT_BYTES} bytes (UTF-8).")
