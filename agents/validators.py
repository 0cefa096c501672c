"""Validation of agent inputs, shared by the API and the admin (one rule, two doors)."""

from __future__ import annotations

import json

from django.core.exceptions import ValidationError

MAX_PARAMS_BYTES = 8 * 1024
# How an agent's context is searched (context.sparse.SEARCH_MODES; agents does not
# import context).
SEARCH_MODES = ("dense", "sparse", "hybrid")
# Known parameters and their allowed ranges; others are kept as given.
PARAM_RANGES = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, 131072),
    "top_k": (int, 0, 100),
    # How many times a run may ask the model (each tool-calling turn is one).
    "max_steps": (int, 1, 50),
}


def validate_params(value) -> None:
    """An agent's `params`: a JSON object of at most MAX_PARAMS_BYTES, known keys in
    range. Raises Django's ValidationError (DRF's validators turn it into a 400)."""
    if not isinstance(value, dict):
        raise ValidationError("Must be a JSON object.")
    if len(json.dumps(value).encode()) > MAX_PARAMS_BYTES:
        raise ValidationError(f"Must be at most {MAX_PARAMS_BYTES} bytes as JSON.")
    errors = []
    for key, (kind, low, high) in PARAM_RANGES.items():
        if key not in value:
            continue
        v = value[key]
        ok_type = isinstance(v, int | float) if kind is float else isinstance(v, int)
        if isinstance(v, bool) or not ok_type or not low <= v <= high:
            kind_name = "an integer" if kind is int else "a number"
            errors.append(f"{key}: must be {kind_name} in [{low}, {high}].")
    mode = value.get("search_mode")
    if mode is not None and mode not in SEARCH_MODES:
        errors.append(f"search_mode: must be one of {', '.join(SEARCH_MODES)}.")
    if errors:
        raise ValidationError(errors)
