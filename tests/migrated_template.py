"""The test database as a copy of a migrated template, instead of migrating it anew in
every test process (4-9 s each, more under load).

The template is migrated once per set of migrations (`migrations_digest`: every
installed app's migration files, Django's and third parties' included) and kept: on
PostgreSQL a database `<test name>_tpl_<digest>` that each process clones with `CREATE
DATABASE ... TEMPLATE`, on SQLite a file beside the test database that each copies.
The xdist processes start at once: the first to take the lock (a PostgreSQL advisory
lock on the test database's name, or a file lock beside the SQLite file) builds the
template, the others wait and clone it. Templates of other migrations are dropped then;
every run clones under the same lock, so none is dropped while a run needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from django.apps import apps
from django.conf import settings
from django.db import connections
from django.test.utils import teardown_databases


def migrations_digest() -> str:
    """A digest of every installed app's migration files (name and content)."""
    digest = hashlib.sha256()
    for app in sorted(apps.get_app_configs(), key=lambda a: a.label):
        for path in sorted(Path(app.path, "migrations").glob("*.py")):
            digest.update(f"{app.label}/{path.name}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def setup_test_database(verbosity: int = 0) -> list[tuple]:
    """Create the default alias's test database from the migrated template and point
    the connection at it. Returns what django.test.utils.teardown_databases takes."""
    connection = connections["default"]
    old_name = connection.settings_dict["NAME"]
    test_name = connection.creation._get_test_db_name()
    # The template's name: the test database's, without xdist's suffix (`_gw0`).
    prefix = test_name.rsplit("_gw", 1)[0] + "_tpl_"
    engine = (_Postgres if connection.vendor == "postgresql" else _Sqlite)(connection, prefix)
    template = prefix + migrations_digest()
    with engine.lock():
        if not engine.exists(template):
            engine.drop_templates()
            _migrate_into(connection, f"{template}_building", verbosity)
            engine.rename(f"{template}_building", template)
        engine.clone(template, test_name)
    _point_at(connection, test_name)
    return [(connection, old_name, True)]


def teardown_test_database(databases: list[tuple], verbosity: int = 0) -> None:
    """Drop the test database. On PostgreSQL the sessions still open in it are ended
    first: a thread that outlived its test (a live worker's, a live server's) may hold a
    pooled connection, and DROP DATABASE refuses while one is open."""
    for connection, _old_name, _destroy in databases:
        if connection.vendor == "postgresql":
            with connection._nodb_cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    [connection.settings_dict["NAME"]],
                )
    teardown_databases(databases, verbosity=verbosity)


def _point_at(connection, name: str) -> None:
    connection.close()
    if connection.vendor == "postgresql":
        connection.close_pool()  # the pool keeps the database it first connected to
    settings.DATABASES[connection.alias]["NAME"] = name
    connection.settings_dict["NAME"] = name


def _migrate_into(connection, name: str, verbosity: int) -> None:
    """Django's own creation of a test database (create, migrate), under `name`."""
    test_settings = connection.settings_dict["TEST"]
    given = test_settings.get("NAME")
    test_settings["NAME"] = name
    try:
        connection.creation.create_test_db(verbosity, autoclobber=True, serialize=False)
    finally:
        test_settings["NAME"] = given
    _point_at(connection, connection.settings_dict["NAME"])  # closes every connection


class _Postgres:
    def __init__(self, connection, prefix: str) -> None:
        self.connection = connection
        self.prefix = prefix
        self.quote = connection.ops.quote_name

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self.connection._nodb_cursor() as cursor:
            self.cursor = cursor
            cursor.execute("SELECT pg_advisory_lock(hashtext(%s))", [self.prefix])
            try:
                yield
            finally:
                cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", [self.prefix])

    def exists(self, name: str) -> bool:
        self.cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        return self.cursor.fetchone() is not None

    def drop_templates(self) -> None:
        self.cursor.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [self.prefix]
        )
        for (name,) in self.cursor.fetchall():
            self.cursor.execute(f"DROP DATABASE {self.quote(name)}")

    def rename(self, source: str, target: str) -> None:
        self.cursor.execute(f"ALTER DATABASE {self.quote(source)} RENAME TO {self.quote(target)}")

    def clone(self, template: str, name: str) -> None:
        self.cursor.execute(f"DROP DATABASE IF EXISTS {self.quote(name)}")
        self.cursor.execute(f"CREATE DATABASE {self.quote(name)} TEMPLATE {self.quote(template)}")


class _Sqlite:
    def __init__(self, connection, prefix: str) -> None:
        self.prefix = prefix

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(f"{self.prefix.removesuffix('_tpl_')}.template-lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def exists(self, name: str) -> bool:
        return os.path.exists(name)

    def drop_templates(self) -> None:
        for path in Path(self.prefix).parent.glob(Path(self.prefix).name + "*"):
            path.unlink()

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def clone(self, template: str, name: str) -> None:
        for stale in (f"{name}-wal", f"{name}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        shutil.copyfile(template, name)
