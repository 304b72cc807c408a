"""The worker protocol of ``sdrt bench``: each system in its own process, one JSON request per line.

A worker module (``python -m sdrt.bench --worker`` for sdrt and the OpenVINO peer,
``python -m sdrt_export.bench_diffusers --worker``, ``python -m sdrt_export.bench_peers --worker``)
calls ``serve(system)``; the parent holds a ``Worker`` per system. Timing starts at launch, so the
worker's first load and run are its cold start; peak RSS is the worker's own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from sdrt.errors import SdrtError


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(system) -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per line on the original stdout.
    ``system.load(request)`` may return a dict (precision, notes) that the reply carries."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the reply stream
    replies = os.fdopen(reply_fd, "w", buffering=1)
    replies.write(json.dumps({"ready": True, "info": system.info()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            start = time.perf_counter()
            if request["cmd"] == "load":
                extra = system.load(request) or {}
                reply = {"seconds": time.perf_counter() - start, **extra}
            elif request["cmd"] == "run":
                reply = {"timings": system.run(request)}
            else:
                break
        except Exception as exc:  # reported to the parent, which raises it as an SdrtError
            reply = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        reply["peak_rss_bytes"] = peak_rss_bytes()
        replies.write(json.dumps(reply) + "\n")


class Worker:
    """The parent's handle on one worker process; timing starts at launch (the cold start)."""

    def __init__(self, name: str, module: str, threads: int):
        self.name, self.stderr, self.peak_rss = name, tempfile.TemporaryFile(mode="w+"), 0
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        hello = self._read()
        self.process_start = time.perf_counter() - self.launched
        self.info = hello.get("info", {})

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
            raise SdrtError(f"{self.name} worker exited ({self.proc.returncode}): {lines[-1] if lines else 'no output'}")
        reply = json.loads(line)
        if "error" in reply:
            raise SdrtError(f"{self.name} worker: {reply['error']}")
        self.peak_rss = max(self.peak_rss, reply.get("peak_rss_bytes", 0))
        return reply

    def ask(self, cmd: str, **request) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **request}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
