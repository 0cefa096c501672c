"""Hosts as Linux network namespaces joined by veth pairs on one bridge, for tests that
need processes on separate hosts (links that go down, hosts that die).

    with NetBed(["services", "worker1", "worker2"]) as bed:
        bed.spawn("services", [...])        # a process "on" that host
        bed.address("services")             # its IP on the bed's network
        bed.link("worker1", up=False)       # cut the host off (its cable pulled)

The bridge lives in a namespace of its own (nothing changes in the machine's own
network), plus one veth into the root namespace (`bed.address("root")`) so the test
process itself reaches the hosts. Everything is made with iproute2 and removed at the
end. `unavailable()` says why a bed cannot be made here (not root, no `ip`, no netns).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why no bed can be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not on PATH"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"uwsprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NetBed:
    def __init__(self, hosts: list[str]) -> None:
        self.tag = uuid.uuid4().hex[:5]
        # 10.<a>.<b>.0/24, <a>.<b> from the tag: two beds at once do not collide.
        number = int(self.tag, 16)
        self.subnet = f"10.{100 + number % 100}.{(number // 100) % 250}"
        self.hosts = list(hosts)
        self.switch = f"uws{self.tag}sw"
        self._addresses = {name: f"{self.subnet}.{i + 1}" for i, name in enumerate(hosts)}
        self._addresses["root"] = f"{self.subnet}.254"
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._root_if = f"uws{self.tag}r"
        self._root_peer = f"uws{self.tag}q"

    def ns(self, host: str) -> str:
        return f"uws{self.tag}{host}"

    def address(self, host: str) -> str:
        return self._addresses[host]

    def _peer(self, index: int) -> str:
        return f"uws{self.tag}p{index}"  # the bridge's end of a host's cable

    def __enter__(self) -> NetBed:
        try:
            _ip("netns", "add", self.switch)
            self._made.append(self.switch)
            bridge = ("-n", self.switch)
            _ip(*bridge, "link", "add", "br0", "type", "bridge")
            _ip(*bridge, "link", "set", "br0", "up")
            _ip(*bridge, "link", "set", "lo", "up")
            for index, host in enumerate(self.hosts):
                ns, peer = self.ns(host), self._peer(index)
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", peer)
                _ip("link", "set", peer, "netns", self.switch)
                _ip(*bridge, "link", "set", peer, "master", "br0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
            # The test process's own cable, from the root namespace.
            _ip("link", "add", self._root_if, "type", "veth", "peer", self._root_peer)
            _ip("link", "set", self._root_peer, "netns", self.switch)
            _ip(*bridge, "link", "set", self._root_peer, "master", "br0", "up")
            _ip("addr", "add", f"{self.address('root')}/24", "dev", self._root_if)
            _ip("link", "set", self._root_if, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def link(self, host: str, *, up: bool) -> None:
        """Plug or pull a host's cable (its bridge end goes down: both ways cut)."""
        peer = self._peer(self.hosts.index(host))
        _ip("-n", self.switch, "link", "set", peer, "up" if up else "down")

    def spawn(
        self, host: str, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path
    ) -> subprocess.Popen:
        """Start a process on a host, in a process group of its own."""
        out = open(log, "wb")  # noqa: SIM115 (the child keeps it; closed with the process)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        self._procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def close(self) -> None:
        for proc in self._procs:
            self.kill(proc)
        _ip("link", "del", self._root_if, check=False)
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()
