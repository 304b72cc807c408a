"""SIGTERM on a real ``sdrt serve`` with a job running: stop taking work, let the running job finish
within --drain-timeout (else cancel it), cancel queued jobs, exit 0."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.serve_fixtures import PROMPT, SubprocessServer, wait_until

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow


def _start_sync(url: str, steps: int) -> tuple[threading.Thread, dict]:
    """A synchronous txt2img at the artifact's largest size (slow enough to be caught running)."""
    out: dict = {}

    def call():
        try:
            out["response"] = httpx.post(f"{url}/sdapi/v1/txt2img", json={
                "prompt": PROMPT, "steps": steps, "seed": 3, "width": 256, "height": 256}, timeout=300)
        except httpx.HTTPError as exc:
            out["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, out


def _follow(url: str, job_id: str) -> tuple[threading.Thread, list]:
    names: list = []

    def read():
        try:
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=180) as response:
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        names.append(line[len("event: "):])
        except httpx.HTTPError as exc:
            names.append(f"http error {exc}")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, names


def _running(url: str) -> bool:
    return httpx.get(f"{url}/sdapi/v1/progress", timeout=30).json()["state"]["sampling_step"] >= 1


def test_sigterm_lets_the_running_job_finish_and_cancels_the_queue(tiny_engine_dir):
    srv = SubprocessServer(tiny_engine_dir, "--drain-timeout", "120", "--threads", "1")
    try:
        srv.wait_ready(httpx.Client(timeout=30))
        thread, out = _start_sync(srv.url, steps=20)
        wait_until(lambda: _running(srv.url), 120, 0.05, "the sync job running")
        queued = httpx.post(f"{srv.url}/v1/jobs", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64},
                            timeout=30).json()
        follower, names = _follow(srv.url, queued["id"])
        wait_until(lambda: names, 30, what="the queued job's first event")
        code = srv.terminate(timeout=240)
        thread.join(60)
        follower.join(60)
    finally:
        srv.terminate()
    assert code == 0, "\n".join(srv.lines[-20:])
    response = out.get("response")
    assert response is not None and response.status_code == 200, out
    assert len(response.json()["images"]) == 1 and json.loads(response.json()["info"])["steps"] == 20
    assert names == ["queued", "cancelled"]
    assert any("draining" in line for line in srv.lines)


def test_sigterm_cancels_a_job_past_the_drain_timeout(tiny_engine_dir):
    srv = SubprocessServer(tiny_engine_dir, "--drain-timeout", "1", "--threads", "1")
    try:
        srv.wait_ready(httpx.Client(timeout=30))
        thread, out = _start_sync(srv.url, steps=150)
        wait_until(lambda: _running(srv.url), 120, 0.05, "the sync job running")
        code = srv.terminate(timeout=120)
        thread.join(30)
    finally:
        srv.terminate()
    assert code == 0, "\n".join(srv.lines[-20:])
    response = out.get("response")
    assert response is not None and response.status_code == 409, out
    assert response.json() == {"error": "Cancelled", "detail": "the server is shutting down (drain timeout)"}
