"""The job queue: a bounded FIFO feeding ``executor.concurrency`` worker threads, job records with a
TTL and a maximum count, and events for Server-Sent Events and waiting handlers.

Job records live in a ``JobStore`` (``MemoryJobStore`` here; a shared store can replace it so job state
does not live in one process only). The queue touches records only through the store's methods and
re-reads them when waiting, so a remote store works too (waiters also poll, every ``POLL_S``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid

from sdrt.errors import Cancelled, SdrtError
from sdrt.serve.executor import Executor, GenRequest
from sdrt.serve.job_store import (CANCELLED, FAILED, POLL_S, QUEUED, RUNNING, SUCCEEDED, TERMINAL,  # noqa: F401
                                  Job, JobStore, MemoryJobStore, Notifier)

log = logging.getLogger(__name__)

INTERRUPT, SKIP = "interrupt", "skip"  # on_step answers besides True/False (see executor.StepHook)


class QueueFull(SdrtError):
    """More than ``max_queue`` jobs are waiting (HTTP 429)."""


class Draining(SdrtError):
    """The server is shutting down and takes no new jobs (HTTP 503)."""


class JobQueue:
    """Bounded FIFO of job ids, ``executor.concurrency`` workers, records kept ``ttl`` s (at most ``max_jobs``)."""

    def __init__(self, executor: Executor, max_queue: int = 16, ttl: float = 600.0, max_jobs: int = 256,
                 store: JobStore | None = None, metrics=None):
        self.executor, self.max_queue, self.ttl, self.max_jobs = executor, max_queue, ttl, max_jobs
        self.store = store if store is not None else MemoryJobStore()
        self.metrics = metrics  # sdrt.serve.metrics.Metrics or None
        self.notifier = Notifier()
        self._pending: collections.deque[str] = collections.deque()
        self._running: set[str] = set()
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self._workers = [threading.Thread(target=self._work, name=f"sdrt-worker-{i}", daemon=True)
                         for i in range(max(1, int(executor.concurrency)))]
        for worker in self._workers:
            worker.start()

    # ---- submitting and reading ----
    def submit(self, request: GenRequest, route: str = "jobs") -> Job:
        """Queue ``request``; QueueFull when ``max_queue`` jobs wait already, Draining while shutting down."""
        self.expire()
        max_batch = int(self.executor.manifest_info.get("sizes", {}).get("max_batch", 1))
        per_run = max(1, min(request.batch_size or max_batch, max_batch))
        runs = -(-request.count // per_run)  # as executor.run_request splits the images
        job = Job(id=uuid.uuid4().hex, request=request, route=route, steps=request.steps * runs)
        with self._cond:
            if self.draining or self._stop:
                raise Draining("the server is shutting down; not taking new jobs")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); retry later")
            job.events.append({"event": "queued", "data": {"id": job.id, "position": len(self._pending)}})
            self.store.add(job)
            self._pending.append(job.id)
            self._cond.notify()
        self._changed()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def is_expired(self, job_id: str) -> bool:
        return job_id in self._expired

    def position(self, job_id: str) -> int | None:
        with self._cond:
            try:
                return self._pending.index(job_id)
            except ValueError:
                return None

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def running(self) -> list[str]:
        with self._cond:
            return list(self._running)

    async def wait_async(self, job_id: str, seen_events: int = 0, timeout: float = POLL_S) -> Job | None:
        """Return the job once it has more than ``seen_events`` events or is finished (or after ``timeout``)."""
        job = self.store.get(job_id)
        if job is None or job.state in TERMINAL or len(job.events) > seen_events:
            return job
        await self.notifier.wait(timeout)
        return self.store.get(job_id)

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block this thread until the job finishes or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.store.get(job_id)
            left = deadline - time.monotonic()
            if job is None or job.state in TERMINAL or left <= 0:
                return job
            with self.notifier.changed:
                self.notifier.changed.wait(min(left, POLL_S))

    # ---- cancelling ----
    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None:
        """A queued job leaves the queue and never runs; a running one stops at its next step."""
        with self._cond:
            queued = job_id in self._pending
            if queued:
                self._pending.remove(job_id)
        job = self.store.get(job_id)
        if job is None or job.state in TERMINAL:
            return job
        if queued:
            job = self._finish(job_id, CANCELLED, error={"error": "Cancelled", "detail": reason, "status": 409},
                               cancel_requested=True, cancel_reason=reason)
        else:
            job = self.store.update(job_id, cancel_requested=True, cancel_reason=reason)
        self._changed()
        return job

    def control_running(self, action: str) -> list[str]:
        """A1111 ``interrupt`` (stop, keep what is denoised so far) or ``skip`` (end the current image run)."""
        ids = self.running()
        for job_id in ids:
            self.store.update(job_id, control=action)
        self._changed()
        return ids

    def cancel_running(self, reason: str = "interrupted") -> list[str]:
        ids = self.running()
        for job_id in ids:
            self.cancel(job_id, reason)
        return ids

    # ---- draining and closing ----
    def begin_drain(self) -> None:
        """Refuse new jobs and cancel the queued ones; running jobs go on."""
        with self._cond:
            self.draining = True
            pending = list(self._pending)
        for job_id in pending:
            self.cancel(job_id, "the server is shutting down")

    def drain(self, timeout: float) -> bool:
        """``begin_drain``, wait up to ``timeout`` s for running jobs, then cancel them. True if none was cut."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            with self.notifier.changed:
                self.notifier.changed.wait(POLL_S)
        cut = self.cancel_running("the server is shutting down (drain timeout)")
        return not cut

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(timeout)

    # ---- housekeeping ----
    def expire(self, now: float | None = None) -> None:
        """Drop finished records older than ``ttl``, and the oldest finished ones beyond ``max_jobs``."""
        now = time.time() if now is None else now
        finished = sorted((j for j in self.store.jobs() if j.state in TERMINAL), key=lambda j: j.finished or 0)
        over = len(self.store.jobs()) - self.max_jobs
        for job in finished:
            if over > 0 or now - (job.finished or now) > self.ttl:
                self.store.remove(job.id)
                self._expired[job.id] = None
                over -= 1
        while len(self._expired) > 16 * self.max_jobs:
            self._expired.popitem(last=False)

    def _changed(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth())
        self.notifier.notify()

    def _finish(self, job_id: str, state: str, **changes) -> Job | None:
        name = {SUCCEEDED: "done", FAILED: "error", CANCELLED: "cancelled"}[state]
        event = {"event": name, "data": {"state": state, **({"error": changes["error"]} if "error" in changes else {})}}
        if self.metrics is not None:
            self.metrics.jobs.labels(state=state).inc()
        return self.store.update(job_id, event, state=state, finished=time.time(), **changes)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job_id = self._pending.popleft()
                self._running.add(job_id)
            try:
                self._run(job_id)
            finally:
                with self._cond:
                    self._running.discard(job_id)
                self._changed()

    def _run(self, job_id: str) -> None:
        job = self.store.update(job_id, {"event": "running", "data": {}}, state=RUNNING, started=time.time())
        if job is None:
            return
        self._changed()

        def on_step(step: int, total: int) -> bool:
            current = self.store.update(job_id, {"event": "step", "data": {"step": step, "steps": total}},
                                        step=step, steps=total)
            self.notifier.notify()
            if current is None or current.cancel_requested:
                return False
            control = current.control
            if control == SKIP:  # once: the next image run goes on
                self.store.update(job_id, control=None)
            return control or True

        try:
            result = self.executor.generate(job.request, on_step)
        except Cancelled as exc:
            current = self.store.get(job_id)
            detail = (current.cancel_reason if current and current.cancel_reason else str(exc))
            self._finish(job_id, CANCELLED, error={"error": "Cancelled", "detail": detail, "status": 409})
        except SdrtError as exc:
            from sdrt.serve.errors import status_for

            self._finish(job_id, FAILED, error={"error": type(exc).__name__, "detail": str(exc),
                                                "status": status_for(exc)})
        except Exception as exc:  # a bug or a backend failure: logged with its traceback, reported without
            log.exception("job %s failed", job_id)
            self._finish(job_id, FAILED, error={"error": "InternalError", "status": 500,
                                                "detail": f"generation failed ({type(exc).__name__}); "
                                                          "see the server log"})
        else:
            self._finish(job_id, SUCCEEDED, result=result)
            if self.metrics is not None:
                self.metrics.observe_result(result, time.time() - job.created)
        finally:
            self.expire()

