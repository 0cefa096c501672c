"""A PostgreSQL server of the test's own: a cluster in a temporary folder, on a port of
its own, that the test may kill and restart (never the machine's shared server).

It runs from the binaries of the installed PostgreSQL (/usr/lib/postgresql/*/bin). As
root (PostgreSQL refuses to run as root) it runs as the `postgres` user through
`runuser`. Where none of that is possible, `PrivatePostgres.unavailable()` says why, for
the test to skip with.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        self.bin = Path(found[-1]).parent if found else None
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="uws-pg-"))
        self.data = self.folder / "data"
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/uws"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why no private server can run here, or None."""
        if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
            return "no PostgreSQL binaries under /usr/lib/postgresql/*/bin"
        if os.geteuid() == 0 and not shutil.which("runuser"):
            return "running as root without runuser: PostgreSQL refuses to run as root"
        return None

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)

    def init(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.folder, user="postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "uws")
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"),
                  "-w", "start")  # fmt: skip

    def kill(self) -> None:
        """As a crash: no checkpoint, connections dropped at once."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def restart_fast(self) -> None:
        # -l again: the restarted server must not write to (and hold open) our pipes.
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-m", "fast",
                  "-w", "restart")  # fmt: skip

    def destroy(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)
