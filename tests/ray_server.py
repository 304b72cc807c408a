"""The ``sdrt serve --ray`` server process of tests/test_serve_ray.py and what it started: its process tree
(from /proc), its listening sockets, SIGTERM and a last-resort kill of everything it left."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

START_S = 300  # Ray + 2 replicas on a busy 2-core machine: about a minute; bounded here
MODEL_REPLICA = "ray::ServeReplica:sdrt:SdrtModel"


def free_port() -> int:
    """A free port below Linux's ephemeral range, which Ray's own processes draw from while it starts
    (a port taken from there can be gone by the time Ray's proxy binds it)."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line), from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out[int(name)] = (ppid, cmd)
    return out


def descendants(root: int) -> dict[int, str]:
    procs, found, todo = processes(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, cmd) in procs.items():
            if ppid == parent and pid not in found:
                found[pid] = cmd
                todo.append(pid)
    return found


def listening(pids) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the given processes hold, from /proc/net."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                    out.append((inodes[fields[9]], fields[1]))
    return out


def is_loopback(hex_address: str) -> bool:
    """/proc/net address (hex, 32-bit words little-endian): 127.0.0.0/8, ::1 or ::ffff:127.x.x.x."""
    host = hex_address.split(":")[0].upper()
    if len(host) == 8:
        return host.endswith("7F")
    return host == "00000000000000000000000001000000" or (
        host.startswith("0000000000000000FFFF0000") and host.endswith("7F"))


class Server:
    def __init__(self, engine_dir, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdrt.cli", "serve", "--engines", str(engine_dir), "--host", "127.0.0.1",
             "--port", str(self.port), "--threads", "1", "--max-steps", "1000", "--drain-timeout", "60",
             "--ray", "--replicas", "2"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.seen: dict[int, str] = {}

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"sdrt serve --ray exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        pytest.fail(f"not ready within {START_S} s:\n{self.output()}")

    def track(self) -> dict[int, str]:
        """Remember every process the server started (the cleanup check covers replicas Ray restarted)."""
        self.seen.update(descendants(self.proc.pid))
        return self.seen

    def model_replicas(self) -> list[int]:
        return sorted(pid for pid, cmd in descendants(self.proc.pid).items() if cmd.startswith(MODEL_REPLICA))

    def stop(self, timeout=120) -> int | None:
        self.track()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.5)
        return self.proc.poll()

    def alive(self) -> list[str]:
        procs = processes()
        return [f"{pid} {cmd}" for pid, cmd in self.seen.items() if pid in procs and procs[pid][1] == cmd]

    def kill_all(self) -> None:
        for pid in [self.proc.pid, *self.seen]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(30)
        self.log.close()
