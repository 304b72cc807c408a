"""Job records and where they live: ``Job``, the ``JobStore`` protocol, ``MemoryJobStore`` (this process), and
``Notifier`` (wakes waiting handlers and threads). A shared store can replace ``MemoryJobStore`` so job state
does not live in one process only; ``JobQueue`` (jobs.py) uses nothing but the protocol's methods."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from sdrt.serve.executor import GenRequest, GenResult

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
POLL_S = 0.25


@dataclass
class Job:
    id: str
    request: GenRequest
    route: str = "jobs"
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0  # total steps over the request's runs (known exactly from its first step)
    error: dict | None = None  # {"error": type, "detail": message, "status": http status}
    result: GenResult | None = None
    cancel_requested: bool = False
    cancel_reason: str = ""
    control: str | None = None  # INTERRUPT or SKIP, asked for while running (A1111 interrupt / skip)
    events: list = field(default_factory=list)  # [{"event": name, "data": {...}}], append-only

    def public(self, position: int | None = None) -> dict:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        return {"id": self.id, "state": self.state, "position": position, "step": self.step, "steps": self.steps,
                "seed": self.request.seeds[0], "seeds": list(self.request.seeds), "error": self.error,
                "images": len(self.result.images) if self.result else 0}


class JobStore(Protocol):
    def add(self, job: Job) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def update(self, job_id: str, event: dict | None = None, **changes) -> Job | None:
        """Apply ``changes`` (and append ``event``) atomically; the updated record, or None if gone."""

    def remove(self, job_id: str) -> None: ...

    def jobs(self) -> list[Job]: ...


class MemoryJobStore:
    """Job records in this process's memory."""

    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def update(self, job_id: str, event: dict | None = None, **changes) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            for key, value in changes.items():
                setattr(job, key, value)
            if event is not None:
                job.events.append(event)
            return job

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())


class Notifier:
    """Wakes waiting asyncio handlers (any loop) and threads when any job changes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: set = set()
        self.changed = threading.Condition()

    def notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                pass
        with self.changed:
            self.changed.notify_all()

    async def wait(self, timeout: float = POLL_S) -> None:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(entry)
