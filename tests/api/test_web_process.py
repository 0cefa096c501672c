"""What a web process sets up as it loads (config.asgi), seen in a process of its own
that loads the entry point as uvicorn does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import gc, config.asgi; print(gc.get_threshold()[0], gc.get_freeze_count())"


@pytest.mark.parametrize(("threshold", "frozen"), [("20000", True), ("0", False)])
def test_the_collector_leaves_what_the_process_loaded_alone(threshold, frozen):
    """WEB_GC_THRESHOLD0 set: what the process loaded is frozen out of collections and
    the youngest generation waits for that many allocations; 0: Python's own settings."""
    env = {**os.environ, "WEB_GC_THRESHOLD0": threshold}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    young, frozen_objects = map(int, result.stdout.split())
    if frozen:
        assert young == 20000 and frozen_objects > 10_000
    else:
        assert young == 700 and frozen_objects == 0
