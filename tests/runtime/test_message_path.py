"""docs/chat-message.md lists the files one chat message runs through; bin/message_path.py
traces a real message (every call, every thread). The two agree, so the page stays true
as the code moves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
FILE = re.compile(r"`([a-z_]+(?:/[a-z_]+)*\.py)`")


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_the_documented_path_is_the_path_a_message_takes():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["REDIS_URL"] = settings.REDIS_URL  # this test process's own database, emptied
    traced = subprocess.run(
        [sys.executable, "bin/message_path.py"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stderr
    out, doc = traced.stdout, (ROOT / "docs" / "chat-message.md").read_text()
    for side, (begin, end), (doc_begin, doc_end) in (
        ("web", ("web:", "worker:"), ("## Web side", "## Worker side")),
        ("worker", ("worker:", "\x00"), ("## Worker side", "## Double-backs")),
    ):
        part = out[out.index(begin) :] if end == "\x00" else _section(out, begin, end)
        ran = set(re.findall(r"^  ([a-z_/]+\.py)$", part, re.M))
        documented = set(FILE.findall(_section(doc, doc_begin, doc_end)))
        assert ran, out
        assert ran == documented, (
            f"{side}: ran but not in the page {sorted(ran - documented)}, "
            f"in the page but did not run {sorted(documented - ran)}"
        )
        count = int(re.search(rf"{side}: (\d+) files", out).group(1))
        assert f"{count} files" in _section(doc, doc_begin, doc_end).splitlines()[0]
