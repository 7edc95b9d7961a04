"""A Ray cluster of several nodes on this machine, started the way KubeRay starts pods.

Each node is one ``ray start --block`` process in its own session, on loopback, with its
own ports (never Redis's 6379).  :meth:`LocalCluster.stop` ends exactly the processes its
nodes started (found through their session and their parent links, never by name), so
another Ray cluster on the machine is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LOOPBACK = "127.0.0.1"
NODE_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ProcessId:
    """A PID with its start time, so a recycled PID is never mistaken for ours."""

    pid: int
    started: str

    @classmethod
    def read(cls, pid: int) -> ProcessId | None:
        stat = _stat(pid)
        return None if stat is None else cls(pid, stat[19])

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[19] == self.started and stat[0] != "Z"


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _descendants(root: int) -> set[int]:
    """The live processes of the session ``root`` leads (Ray's agents outlive their parent
    and are re-parented to init) and every process whose parent chain leads to one of
    them; ``root`` itself only while it runs (once reaped, its PID may be another's)."""
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z":
            parents[int(entry.name)], sessions[int(entry.name)] = int(stat[1]), int(stat[3])
    found = {pid for pid, session in sessions.items() if session == root}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    known: set[ProcessId] = field(default_factory=set)

    def remember(self) -> None:
        """Note every process the node runs now, so they can be ended after it is gone."""
        for pid in _descendants(self.process.pid):
            if (proc := ProcessId.read(pid)) is not None:
                self.known.add(proc)

    def raylet(self) -> int | None:
        for pid in sorted(_descendants(self.process.pid)):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        return None


class LocalCluster:
    """A head and ``workers`` worker nodes: :meth:`start`, then always :meth:`stop`."""

    def __init__(
        self,
        log_dir: Path,
        env: dict[str, str],
        *,
        workers: int = 2,
        cpus_per_node: int = 1,
        ray_bin: Path,
    ) -> None:
        self.log_dir = log_dir
        # A temp root of its own (short: Unix socket paths live in it): Ray's session files
        # and the `ray_current_cluster` pointer that a later `ray.init()` would follow
        # stay out of /tmp/ray, and go with the cluster.
        self.temp_root = Path(tempfile.mkdtemp(prefix="tipgraph-ray-"))
        # Ray's token auth with a token of this cluster's own: whatever ~/.ray/auth_token
        # holds, the dashboard's REST API answers only callers given this token.
        self.auth_token = secrets.token_hex(32)
        self.env = {
            **env,
            "RAY_TMPDIR": str(self.temp_root),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.auth_token,
        }
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.ray_bin = ray_bin
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.nodes: list[Node] = []
        self._discarded: list[Node] = []

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        """What a call to the dashboard's REST API carries."""
        return {"Authorization": f"Bearer {self.auth_token}"}

    def start(self, timeout_s: float = 120.0) -> LocalCluster:
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> LocalCluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_node(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                f"--dashboard-host={LOOPBACK}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        self._wait_for_nodes(1, timeout_s)
        # One at a time, and again if one dies starting: a raylet that cannot register
        # with a busy GCS within Ray's 30 s exits (seen on this 2-core machine).
        for index in range(1, self.workers + 1):
            name = f"worker-{index}"
            for attempt in range(1, NODE_ATTEMPTS + 1):
                self._start_node(
                    name,
                    [
                        f"--address={self.address}",
                        f"--node-manager-port={free_port()}",
                        f"--object-manager-port={free_port()}",
                    ],
                )
                try:
                    self._wait_for_nodes(1 + index, timeout_s)
                    break
                except NodeExited:
                    if attempt == NODE_ATTEMPTS:
                        raise
                    self._discard(name)
        self.remember_all()
        return self

    def _discard(self, name: str) -> None:
        """Forget a node that died starting; its processes are ended with the rest."""
        node = next(n for n in self.nodes if n.name == name)
        node.remember()
        self.nodes.remove(node)
        self._discarded.append(node)
        (self.log_dir / f"{name}.log").rename(self.log_dir / f"{name}.failed-start.log")

    def _start_node(self, name: str, args: list[str]) -> None:
        command = [
            str(self.ray_bin),
            "start",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={self.cpus_per_node}",
            f"--resources={json.dumps({_resource(name): 1})}",
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
            *args,
        ]
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the node owns it
        process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.nodes.append(Node(name, process))

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The GCS's live nodes (the dashboard's state API)."""
        response = httpx.get(f"{self.dashboard_url}/api/v0/nodes", headers=self.headers, timeout=5)
        response.raise_for_status()
        rows = response.json()["data"]["result"]["result"]
        return [row for row in rows if row["state"] == "ALIVE"]

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None:
                    raise NodeExited(
                        f"ray node {node.name} exited ({node.process.returncode}); "
                        f"see {self.log_dir / node.name}.log"
                    )
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{count} Ray nodes did not come up within {timeout_s:.0f} s")

    def node_ids(self) -> dict[str, str]:
        """Our node name -> Ray node id (from the resource each node is started with)."""
        ids = {}
        for row in self.alive_nodes():
            for node in self.nodes:
                if _resource(node.name) in row.get("resources_total", {}):
                    ids[node.name] = str(row["node_id"])
        return ids

    def remember_all(self) -> None:
        for node in self.nodes:
            node.remember()

    def kill_raylet(self, name: str) -> None:
        """SIGKILL one node's raylet, as when its machine (pod) disappears."""
        node = next(n for n in self.nodes if n.name == name)
        node.remember()
        pid = node.raylet()
        if pid is None:
            raise RuntimeError(f"node {name} has no raylet")
        os.kill(pid, signal.SIGKILL)

    def stop(self, grace_s: float = 15.0) -> None:
        """End every process the nodes started: SIGTERM, then SIGKILL after ``grace_s``."""
        nodes = self.nodes + self._discarded
        for node in nodes:
            node.remember()
        for node in reversed(nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in nodes:
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(5)
        # Processes started after the last look (HAProxy restarts itself on every change of
        # the ingress replicas, also while the cluster stops) are still in a node's session.
        for node in nodes:
            node.remember()
        leftover = {p for node in nodes for p in node.known if p.alive()}
        for proc in leftover:
            _signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p.alive() for p in leftover):
            time.sleep(0.2)
        for proc in leftover:
            if proc.alive():
                _signal(proc.pid, signal.SIGKILL)
        self._keep_serve_logs()
        shutil.rmtree(self.temp_root, ignore_errors=True)

    def _keep_serve_logs(self) -> None:
        """Serve's logs (controller, proxy, every replica) and Ray's own errors next to
        the nodes' logs."""
        for logs in self.temp_root.glob("ray/session_*/logs"):
            if (logs / "serve").is_dir():
                shutil.copytree(logs / "serve", self.log_dir / "serve", dirs_exist_ok=True)
            kept = self.log_dir / "ray"
            kept.mkdir(exist_ok=True)
            for path in (
                *logs.glob("*.err"),
                *logs.glob("raylet*.out"),
                *logs.glob("gcs_server*.out"),
            ):
                shutil.copy2(path, kept / path.name)


class NodeExited(RuntimeError):
    """A node's ``ray start`` process ended."""


def _resource(node: str) -> str:
    """A custom resource naming the node, so its Ray node id can be found."""
    return "rehearsal_" + node.replace("-", "_")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
