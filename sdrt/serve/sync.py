"""Synchronous generation over the job queue: submit, wait, and cancel the job if the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from sdrt.serve.errors import ApiError
from sdrt.serve.executor import GenRequest, GenResult
from sdrt.serve.jobs import SUCCEEDED, TERMINAL, Draining, QueueFull

log = logging.getLogger(__name__)


def submit(request, state, gen: GenRequest, route: str):
    """Queue ``gen``; 429 with Retry-After when the queue is full, 503 while draining."""
    try:
        job = state.queue.submit(gen, route)
    except QueueFull as exc:
        raise ApiError(429, str(exc), "QueueFull", {"Retry-After": "2"}) from None
    except Draining as exc:
        raise ApiError(503, str(exc), "Unavailable", {"Retry-After": "5"}) from None
    request.state.job_id = job.id
    return job


async def run(request, state, gen: GenRequest, route: str) -> GenResult:
    """Submit and wait for the result. A client that disconnects cancels its job (the worker is free
    again at the next step); a job that fails raises its error as ApiError."""
    job = submit(request, state, gen, route)
    try:
        current = await _wait(request, state, job)
    except asyncio.CancelledError:
        # a proxy (Ray Serve's) or the server may cancel the handler instead of reporting a disconnect
        log.info("request cancelled; cancelling job %s", job.id)
        state.queue.cancel(job.id, "the client disconnected")
        raise
    headers = {"X-Sdrt-Replica": state.replica_for(current.result)}
    if current.state == SUCCEEDED:
        return current.result
    error = current.error or {"error": "Failed", "detail": "the job failed", "status": 500}
    raise ApiError(int(error.get("status", 500)), error.get("detail", ""), error.get("error"), headers)


async def _wait(request, state, job):
    deadline, seen = time.monotonic() + state.options.sync_timeout, 0
    while True:
        current = await state.queue.wait_async(job.id, seen)
        if current is None:
            raise ApiError(410, f"job {job.id} expired")
        if current.state in TERMINAL:
            return current
        seen = len(current.events)
        if await request.is_disconnected():
            log.info("client went away; cancelling job %s", job.id)
            state.queue.cancel(job.id, "the client disconnected")
            raise ApiError(499, "client disconnected", "ClientClosedRequest")
        if time.monotonic() > deadline:
            state.queue.cancel(job.id, "synchronous request timed out")
            raise ApiError(504, f"the job did not finish within {state.options.sync_timeout} s", "Timeout")


def json_response(payload: dict, result: GenResult | None, state, status: int = 200):
    from fastapi.responses import Response

    return Response(json.dumps(payload), status_code=status, media_type="application/json",
                    headers={"X-Sdrt-Replica": state.replica_for(result)})


async def read_json(request) -> dict:
    """The body as a JSON object, or 400 naming what is wrong (never a traceback)."""
    raw = await request.body()
    try:
        payload = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"body: malformed JSON ({exc.__class__.__name__}: {str(exc)[:80]})", "InvalidJSON") \
            from None
    if not isinstance(payload, dict):
        raise ApiError(400, "body: expected a JSON object", "InvalidJSON")
    return payload
