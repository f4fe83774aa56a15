"""Real processes for service tests: a Ray cluster started with ``ray start`` and ``turboquant serve``.

Several engineers run Ray tests on one machine at once, so nothing here uses ``ray stop``
(it kills every Ray process on the machine). Each node runs ``ray start --block`` in a
temp folder of its own; teardown sends SIGTERM to those commands (Ray then stops the
node's processes) and afterwards kills whatever process still names that folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

__all__ = ["RayCluster", "ServiceProcess", "free_port", "fresh_database"]

BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: held open together while chosen, since a port just closed
    may be handed out again (two of a node's components on one port stop ``ray start``)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def fresh_database(server_url: str, name: str) -> str:
    """Creates (or re-creates) database ``name`` on the server of ``server_url``; returns its URL."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def _env() -> dict[str, str]:
    # Token auth would write ~/.ray/auth_token; RAY_ADDRESS from the caller must not redirect anything.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{proc.args[:3]} did not print {text!r} within {timeout} s:\n{log.read_text()[-3000:]}")


class RayCluster:
    """A Ray head plus ``workers`` worker nodes on 127.0.0.1, each with ``cpus`` CPUs and its own temp folder."""

    def __init__(self, workers: int = 1, cpus: int = 1):
        # Short path: Ray's unix socket paths live under it and must stay below 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="tqr-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus = cpus
        self.n_workers = workers
        self.procs: list[subprocess.Popen] = []

    def node_dir(self, i: int) -> Path:
        return self.root / ("head" if i == 0 else f"w{i}")

    def _start_node(self, i: int) -> None:
        folder = self.node_dir(i)
        folder.mkdir()
        # Every port the node opens is chosen here: two nodes on one host must not collide, nor
        # with other people's Ray on this machine (the dashboard agent defaults to port 52365).
        chosen = free_ports(7)
        while self.port in chosen:  # the head's port, chosen earlier, is not bound until it starts
            chosen = free_ports(7)
        dashboard, *chosen = chosen
        role = (["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={dashboard}"]
                if i == 0 else [f"--address={self.address}"])
        ports = [f"--{name}-port={port}" for name, port in zip(
            ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
             "metrics-export"), chosen)]
        argv = [str(BIN / "ray"), "start", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                "--num-gpus=0", f"--temp-dir={folder}", "--object-store-memory=100000000",
                "--disable-usage-stats", "--block", *ports]
        log = self.root / f"node{i}.log"
        proc = subprocess.Popen(argv, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        _wait_for_line(proc, log, "block forever", 120)

    def start(self) -> "RayCluster":
        for i in range(self.n_workers + 1):
            self._start_node(i)
        return self

    def alive_nodes(self) -> int:
        """Nodes the cluster's GCS reports alive, asked by a driver process of its own."""
        code = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"cannot join {self.address}: {out.stderr[-2000:]}")
        return int(out.stdout.strip().splitlines()[-1])

    def worker_log_pids(self, i: int) -> set[int]:
        """Pids of the Ray worker processes node ``i`` started (from its ``worker-*-<pid>.out`` logs)."""
        pids = set()
        for f in self.node_dir(i).glob("session_*/logs/worker-*.out"):
            try:
                pids.add(int(f.stem.rsplit("-", 1)[1]))
            except (IndexError, ValueError):
                pass
        return pids

    def _leftovers(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.root) in arg for arg in (p.info["cmdline"] or [])):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def stop(self) -> None:
        # Workers first, then the head; SIGTERM makes `ray start --block` stop its node's processes.
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        # Anything still naming our folder (and its children: Ray workers) is ours alone.
        leftovers = self._leftovers()
        for p in list(leftovers):
            try:
                leftovers += p.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


class ServiceProcess:
    """``turboquant serve`` as a real server process on a free loopback port."""

    def __init__(self, storage: str, *, token: str | None = None, ray_address: str | None = None,
                 log_dir: Path | None = None, options: tuple[str, ...] = ()):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = token
        argv = [str(BIN / "turboquant"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--storage", storage]
        if token:
            argv += ["--token", token]
        if ray_address:
            argv += ["--ray-address", ray_address]
        argv += list(options)
        self.log = Path(log_dir or tempfile.mkdtemp(prefix="tq-serve-")) / "serve.log"
        self.proc = subprocess.Popen(argv, env=_env(), stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"turboquant serve exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/openapi.json", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"turboquant serve did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)

    def wait_study(self, client: httpx.Client, study: str, timeout: float = 300) -> dict:
        """Polls ``GET /studies/{study}`` until it is no longer running; returns the last progress."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = client.get(f"/studies/{study}")
            if r.status_code != 200:
                raise AssertionError(f"GET /studies/{study}: {r.status_code} {r.text}")
            body = r.json()
            if body["status"] not in ("running", "queued"):
                return body
            time.sleep(0.5)
        raise TimeoutError(f"study {study} still running after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        # SIGTERM to the group: uvicorn shuts down and the driver's Ray connection closes with it.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
