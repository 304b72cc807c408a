"""The Ray Serve side of ``sdrt serve --ray``: the model deployment, the ingress and ``RayExecutor``.

Layout (as Ray Serve's Stable Diffusion example, ``APIIngress`` in front of a model deployment):

- ``SdrtModel``: N replicas, each holding one :class:`sdrt.pipeline.Pipeline`. ``generate`` is a
  streaming method: the Pipeline runs in the replica's one worker thread and every step comes back
  as an event, then the result (``executor.run_request``, the same code as ``LocalExecutor``, so the
  pixels are the same). Cancelling the stream stops the Pipeline at its next step.
- ``SdrtIngress``: one replica running the unchanged FastAPI app (``create_app``) with a
  ``RayExecutor``. Where job state lives: the ``JobQueue`` and its records are in this ingress, the
  one place every HTTP request passes through (Ray's proxy forwards all routes to it); the model
  replicas are stateless (a request in, events out). So ``GET /v1/jobs/{id}``, its events and its
  cancel work whichever model replica ran the job, a model replica may die, restart or scale without
  losing any job record (its running job fails with a 503 record), and nothing is kept in a model
  replica's memory. The ingress does no compute, so one replica of it is enough; it is pinned to one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from sdrt.errors import Cancelled, SdrtError
from sdrt.serve.errors import ApiError
from sdrt.serve.executor import INTERRUPT, GenRequest, GenResult, StepHook

log = logging.getLogger(__name__)

RETRIES_BEFORE_START = 2  # a request that died before its first event never ran: it is sent again


LOOPBACK_ENV = "SDRT_RAY_LOOPBACK"  # set by ray_app.run for a local instance: every socket on 127.0.0.1


def keep_replica_on_loopback() -> None:
    """Ray Serve 2.60 replicas open their inter-deployment gRPC server on ``[::]:0`` (every interface,
    hard-coded in ``ray.serve._private.replica``), after the user constructor runs. For a local instance
    (``SDRT_RAY_LOOPBACK=1``) bind it to 127.0.0.1 instead, as everything else is; a no-op otherwise or
    when Ray's internals differ."""
    if os.environ.get(LOOPBACK_ENV) != "1":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "sdrt_loopback", False):
        return

    def loopback(server, address):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback.sdrt_loopback = True
    replica.add_port_to_grpc_server = loopback


def replica_id() -> str:
    """This replica's Ray Serve id, ``app#deployment#unique_id`` (its actor name without the prefix)."""
    from ray import serve

    ctx = serve.get_replica_context()
    rid = ctx.replica_id
    return f"{rid.deployment_id.app_name}#{rid.deployment_id.name}#{rid.unique_id}"


class SdrtModel:
    """One Pipeline per replica. A plain class: ``ray_app.build`` makes it a deployment with its options
    (replicas, ``num_cpus``/``num_gpus``, autoscaling, ``max_ongoing_requests``), so this module imports
    without ray."""

    def __init__(self, engine_dir: str, backend: str = "ort-cpu", threads: int | None = None):
        from sdrt.serve.executor import LocalExecutor

        keep_replica_on_loopback()
        self.local = LocalExecutor(str(engine_dir), backend=backend, threads=threads, replica=replica_id())
        self.local.warm_up()  # healthy only once every engine is open
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrt-replica")
        log.info("replica %s (pid %d) loaded %s", self.local.replica, os.getpid(), engine_dir)

    def info(self) -> dict:
        return {"replica": self.local.replica, "pid": os.getpid(), "manifest_info": self.local.manifest_info}

    async def generate(self, req: GenRequest, key: str | None = None, board=None):
        """Stream ``("started", replica, pid)``, ``("step", step, total)`` per step, then ``("result",
        GenResult)`` or ``("error", SdrtError)``. Cancelled by the caller: the Pipeline stops at its next step.
        A1111 interrupt/skip come the other way through ``board`` (a ``ControlBoard`` actor, entry ``key``)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        control = ControlReader(board, key)

        def on_step(step: int, total: int) -> "bool | str":
            loop.call_soon_threadsafe(events.put_nowait, ("step", step, total))
            return False if stop.is_set() else control.poll()

        def work() -> GenResult:
            if stop.is_set():
                raise Cancelled("cancelled before it started")
            return self.local.generate(req, on_step)

        future = loop.run_in_executor(self._pool, work)

        def ended(done) -> None:
            if not done.cancelled():
                done.exception()  # retrieved here: after a cancelled stream nobody reads it
            events.put_nowait(("end",))

        future.add_done_callback(ended)
        try:
            yield ("started", self.local.replica, os.getpid())
            while (item := await events.get())[0] != "end":
                yield item
            try:
                result = future.result()
            except SdrtError as exc:  # bad input, cancelled, NaN: typed, re-raised by the ingress
                yield ("error", exc)
                return
            yield ("result", result)
        finally:  # normal end, an error, or the caller cancelled the stream (asyncio.CancelledError)
            stop.set()


class ControlBoard:
    """A1111 interrupt / skip on their way from the ingress to a replica (Ray Serve streams go one way
    only): a small Ray actor owned by the ingress, one entry per request in flight."""

    def __init__(self):
        self.answers: dict[str, str] = {}

    def set(self, key: str, answer: str) -> None:
        self.answers[key] = answer

    def take(self, key: str) -> str | None:
        return self.answers.pop(key, None)


class ControlReader:
    """The replica's side of ``ControlBoard``: at each step, reads the answer of the last ``take`` if it has
    arrived (never waits), so a step costs no round trip; an interrupt or skip lands within a step or two."""

    def __init__(self, board, key):
        self.board, self.key, self.pending = board, key, None

    def poll(self) -> "bool | str":
        if self.board is None:
            return True
        import ray

        if self.pending is None:
            self.pending = self.board.take.remote(self.key)
        ready, _ = ray.wait([self.pending], timeout=0)
        if not ready:
            return True
        answer, self.pending = ray.get(self.pending), None
        return answer or True


class ReplicaFailed(ApiError):
    """503 ``{"error": "ReplicaFailed", ...}`` with ``Retry-After``: the replica running a request died."""

    def __init__(self, detail: str):
        super().__init__(503, detail, error="ReplicaFailed", headers={"Retry-After": "2"})

    def __reduce__(self):
        return ReplicaFailed, (self.detail,)


class RayExecutor:
    """The ``Executor`` protocol over the ``SdrtModel`` deployment (``sdrt.serve.executor``)."""

    def __init__(self, handle, manifest_info: dict, concurrency: int, board=None):
        self.stream = handle.options(stream=True)
        self.manifest_info, self.concurrency, self.board = manifest_info, concurrency, board
        self._closed = False

    def ready(self) -> bool:
        return not self._closed

    def generate(self, req: GenRequest, on_step: StepHook) -> GenResult:
        """Blocking (a JobQueue worker thread). Replica death before the first event: sent again (it never
        ran); after it: ``ReplicaFailed`` (503) naming the replica. Ray's own task errors propagate (-> 500)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, TaskCancelledError, \
            WorkerCrashedError

        gone = (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError)
        for attempt in range(RETRIES_BEFORE_START + 1):
            if self._closed:
                raise Cancelled("the server is shutting down")
            key, sent = uuid.uuid4().hex, None
            started, response = None, self.stream.generate.remote(req, key, self.board)
            try:
                for event in response:
                    if event[0] == "started":
                        started = event[1]
                    elif event[0] == "step":
                        answer = on_step(event[1], event[2])
                        if answer is False:
                            response.cancel()
                            raise Cancelled("cancelled")
                        if isinstance(answer, str) and self.board is not None and not answer == sent == INTERRUPT:
                            self.board.set.remote(key, answer)  # A1111 interrupt / skip: the replica polls it
                            sent = answer
                    elif event[0] == "error":
                        raise event[1]
                    elif event[0] == "result":
                        return event[1]
                raise ReplicaFailed("the model replica ended the request without a result; retry")
            except TaskCancelledError:
                raise Cancelled("cancelled") from None
            except gone as exc:
                if started is None and attempt < RETRIES_BEFORE_START:
                    log.warning("replica unavailable before the request started (%s); sending it again",
                                type(exc).__name__)
                    continue
                where = f"replica {started}" if started else "the model replica"
                log.error("%s died during a request: %s", where, type(exc).__name__)
                raise ReplicaFailed(f"{where} died during the request ({type(exc).__name__}); Ray restarts it, "
                                     "retry") from None
            finally:
                if sent is not None:
                    self.board.take.remote(key)  # an answer the replica did not read
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._closed = True


class SdrtIngress:
    """The FastAPI app of ``sdrt serve`` (``create_app``) over a ``RayExecutor``; one replica (see the
    module docstring for why the job state lives here). ``ray_app.build`` wraps it with
    ``serve.ingress()`` (the app is built per replica by ``__serve_build_asgi_app__``) and ``serve.deployment``."""

    async def __init__(self, model, options, concurrency: int):
        import ray

        keep_replica_on_loopback()
        info = await model.info.remote()
        board = ray.remote(ControlBoard).options(num_cpus=0).remote()
        self.executor = RayExecutor(model, info["manifest_info"], concurrency, board)
        # responses not made by a model replica (e.g. 202 on job submit) name the ingress's Ray replica id
        self.options = dataclasses.replace(options, replica=replica_id()) if options is not None else None
        log.info("ingress %s: model %s, %d concurrent generations", replica_id(), info["manifest_info"].get("name"),
                 concurrency)

    def __serve_build_asgi_app__(self):
        from sdrt.serve.app import create_app

        self.asgi = create_app(self.executor, self.options)
        return self.asgi

    async def drain(self, timeout: float) -> bool:
        """Refuse new jobs, cancel queued ones, let running ones finish within ``timeout`` s (then cancel
        them); ``ray_app.run`` calls it on SIGTERM before deleting the application."""
        return await asyncio.to_thread(self.asgi.state.sdrt.queue.drain, timeout)
