"""A PostgreSQL server of the test's own: a cluster in a temporary folder, on a port of
its own, that the test may kill and restart (never the machine's shared server).

It runs from the binaries of the installed PostgreSQL (/usr/lib/postgresql/*/bin). As
root (PostgreSQL refuses to run as root) it runs as the `postgres` user through
`runuser`. Where none of that is possible, `PrivatePostgres.unavailable()` says why, for
the test to skip with.

`init_migrated` gives a cluster with the app's tables and the demo user: a copy of one
made once per set of migrations and PostgreSQL version, and kept in the temporary
folder (migrating takes a minute on a loaded machine; a copy, a fraction of a second).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.local_http import free_port
from tests.migrated_template import migrations_digest

ROOT = Path(__file__).resolve().parents[1]

# The release step (migrate) and the demo user in one process (one Django start, not two).
RELEASE = """
import django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
call_command("demo_user")
"""


def migrated_template() -> Path:
    """Where a migrated cluster is kept for these migrations and this PostgreSQL."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    digest = hashlib.sha256("".join(binaries[-1:]).encode() + migrations_digest().encode())
    return Path(tempfile.gettempdir()) / f"uws-pg-migrated-{digest.hexdigest()[:16]}"


class PrivatePostgres:
    # Lines added to pg_hba.conf (a copy of the template included).
    hba_lines: tuple[str, ...] = ()

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        self.bin = Path(found[-1]).parent if found else None
        self.port = free_port()
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
        self._allow_hosts()
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "uws")
        return self

    def init_migrated(self, env: dict[str, str]) -> str:
        """A started cluster with the app migrated and the demo user: a copy of the kept
        template, or made (with `env`, the app's environment with DATABASE_URL=self.url)
        and kept as the template. Returns the demo user's API token."""
        template = migrated_template()  # its data folder and the token
        if template.is_dir():
            if os.geteuid() == 0:
                shutil.chown(self.folder, user="postgres")
            subprocess.run(["cp", "-a", str(template / "data"), str(self.data)], check=True,
                           timeout=120)  # fmt: skip
            self._allow_hosts()
            self.start()
            return (template / "token").read_text()
        self.init()
        out = subprocess.run(
            [sys.executable, "-c", RELEASE], env=env, check=True, cwd=ROOT, capture_output=True,
            text=True, timeout=300,
        ).stdout  # fmt: skip
        token = out.split("API token: ")[1].split()[0]
        # Kept stopped. The first run to finish it wins; the others' copies are dropped.
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        partial = template.with_name(f"{template.name}.{os.getpid()}")
        partial.mkdir()
        subprocess.run(["cp", "-a", str(self.data), str(partial / "data")], check=True,
                       timeout=120)  # fmt: skip
        (partial / "token").write_text(token)
        try:
            partial.rename(template)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
        self.start()
        return token

    def _allow_hosts(self) -> None:
        if self.hba_lines:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"{line}\n" for line in self.hba_lines)

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
