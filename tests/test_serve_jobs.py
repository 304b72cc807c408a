"""sdrt serve's jobs API, queue and faults, on an in-process server (uvicorn in a thread, 127.0.0.1):
SSE events, images, cancel (queued jobs never run), TTL, load at --max-queue 8, client disconnect,
metrics, the replica header."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import numpy as np
import pytest

from sdrt.pipeline import Pipeline
from tests.serve_fixtures import PROMPT, SlowExecutor, ThreadServer, pixels, png_text, wait_until

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def local(tiny_engine_dir):
    from sdrt.serve.executor import LocalExecutor

    executor = LocalExecutor(str(tiny_engine_dir), threads=1)
    executor.warm_up()
    return executor


@pytest.fixture(scope="module")
def slow(local):
    return SlowExecutor(local)


@pytest.fixture(scope="module")
def server(slow):
    from sdrt.serve.app import ServeOptions

    srv = ThreadServer(slow, ServeOptions(max_queue=8, job_ttl=600))
    yield srv
    srv.close()


@pytest.fixture()
def client(server, slow):
    slow.delay = 0.0
    slow.gate_open.clear()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    slow.gate_open.set()
    wait_until(lambda: not server.state.queue.running() and server.state.queue.depth() == 0, 60, what="idle")


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=1)


def events_of(client, job_id) -> list[tuple[str, dict]]:
    out = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[len("data: "):])))
    return out


def test_job_events_status_and_images(client, pipe):
    body = {"prompt": PROMPT, "steps": 3, "seed": 40, "width": 64, "height": 64, "batch": 2, "scheduler": "Euler a"}
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202 and "x-sdrt-replica" in submitted.headers
    job = submitted.json()
    events = events_of(client, job["id"])
    names = [n for n, _ in events]
    assert names[0] == "queued" and "running" in names and names[-1] == "done"
    steps = [d for n, d in events if n == "step"]
    assert [d["step"] for d in steps] == [1, 2, 3] and steps[-1]["steps"] == 3  # one run of a batch of 2
    status = client.get(job["status_url"]).json()
    assert status["state"] == "succeeded" and status["seed"] == 40 and status["seeds"] == [40, 41]
    expected = pipe.txt2img(PROMPT, steps=3, seed=[40, 41], batch=2, width=64, height=64, scheduler="Euler a")
    for k in range(2):
        image = client.get(f"/v1/jobs/{job['id']}/images/{k}.png")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert "x-sdrt-replica" in image.headers
        np.testing.assert_array_equal(pixels(image.content), expected.images[k])
        assert f"Seed: {40 + k}" in png_text(image.content)
    assert client.get(f"/v1/jobs/{job['id']}/images/2.png").status_code == 404
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404


def test_cancelled_while_queued_never_runs(client, server, slow):
    gate = client.post("/v1/jobs", json={"prompt": "gate", "steps": 2, "width": 64, "height": 64}).json()
    wait_until(lambda: client.get(gate["status_url"]).json()["state"] == "running", what="gate running")
    queued = [client.post("/v1/jobs", json={"prompt": f"queued {i}", "steps": 2, "width": 64, "height": 64}).json()
              for i in range(3)]
    assert [client.get(q["status_url"]).json()["position"] for q in queued] == [0, 1, 2]
    cancelled = client.post(f"/v1/jobs/{queued[1]['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    assert client.get(queued[2]["status_url"]).json()["position"] == 1  # it moved up
    slow.gate_open.set()
    for q in (queued[0], queued[2]):
        wait_until(lambda q=q: client.get(q["status_url"]).json()["state"] == "succeeded", what="queued job done")
    ran = [r.prompt for r in slow.ran]
    assert "queued 0" in ran and "queued 2" in ran and "queued 1" not in ran
    names = [n for n, _ in events_of(client, queued[1]["id"])]
    assert names == ["queued", "cancelled"]
    running = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 150, "width": 64, "height": 64}).json()
    wait_until(lambda: client.get(running["status_url"]).json()["step"] >= 1, what="running job steps")
    client.post(f"/v1/jobs/{running['id']}/cancel")
    final = wait_until(lambda: (s := client.get(running["status_url"]).json())["state"] == "cancelled" and s,
                       what="running job cancelled")
    assert final["step"] < 150


def test_load_24_concurrent_at_max_queue_8(client, server, slow, pipe):
    """The worker is held by a gated job while 24 synchronous requests arrive: 8 queue (then 200 with the right
    image), 16 get 429 with Retry-After; none hangs or is lost; the queue drains to 0."""
    gate = client.post("/v1/jobs", json={"prompt": "gate", "steps": 1, "width": 64, "height": 64}).json()
    wait_until(lambda: client.get(gate["status_url"]).json()["state"] == "running", what="gate running")
    body = {"prompt": PROMPT, "steps": 2, "seed": 9, "width": 64, "height": 64, "sampler_name": "Euler"}

    def one(_):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post("/sdapi/v1/txt2img", json=body)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        wait_until(lambda: sum(f.done() for f in futures) >= 16, 60, what="16 refusals")
        assert server.state.queue.depth() == 8
        slow.gate_open.set()
        responses = [f.result(timeout=120) for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 8 + [429] * 16
    expected = pipe.txt2img(PROMPT, steps=2, guidance=7.0, seed=9, width=64, height=64, scheduler="Euler").images[0]
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"] == "QueueFull"
        else:
            np.testing.assert_array_equal(pixels(r.json()["images"][0]), expected)
    wait_until(lambda: server.state.queue.depth() == 0 and not server.state.queue.running(), what="queue empty")
    metrics = client.get("/metrics").text
    assert "sdrt_queue_depth 0.0" in metrics
    assert 'sdrt_requests_total{route="/sdapi/v1/txt2img",status="429"} 16.0' in metrics


def test_client_disconnect_cancels_its_job(client, server, slow):
    slow.delay = 0.05
    body = {"prompt": "disconnect me", "steps": 150, "width": 64, "height": 64}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=httpx.Timeout(60, read=1.5))
    job = next(j for j in server.state.queue.store.jobs() if j.request.prompt == "disconnect me")
    final = wait_until(lambda: (j := server.state.queue.get(job.id)).state == "cancelled" and j, 30,
                       what="disconnected job cancelled")
    assert final.error["detail"] == "the client disconnected" and final.step < 150
    slow.delay = 0.0
    after = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1, "width": 64, "height": 64})
    assert after.status_code == 200  # the worker is free again


def test_job_ttl_then_410(client, server):
    job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 1, "width": 64, "height": 64}).json()
    wait_until(lambda: client.get(job["status_url"]).json()["state"] == "succeeded", what="job done")
    server.state.queue.expire(now=time.time() + 601)  # --job-ttl 600 later
    gone = client.get(job["status_url"])
    assert gone.status_code == 410 and gone.json()["error"] == "Gone"
    assert client.get(f"/v1/jobs/{job['id']}/images/0.png").status_code == 410


def test_health_ready_metrics_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1, "width": 64, "height": 64})
    text = client.get("/metrics").text
    for name in ("sdrt_requests_total", "sdrt_queue_depth", "sdrt_job_seconds_bucket", "sdrt_stage_seconds_total",
                 "sdrt_images_generated_total", "sdrt_jobs_total"):
        assert name in text, name
    assert 'sdrt_stage_seconds_total{stage="vae_decode"}' in text
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "http" not in page.text.replace("http-equiv", "")
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../app.py").status_code == 404


def test_skip_ends_the_current_image_run_only(client, server, slow):
    """A1111 skip: the running image run stops (its image is what is denoised so far), the next run goes on."""
    import threading

    slow.delay = 0.05
    out = {}
    body = {"prompt": "skip me", "steps": 40, "seed": 5, "width": 64, "height": 64, "n_iter": 2,
            "sampler_name": "Euler"}
    worker = threading.Thread(target=lambda: out.setdefault("r", client.post("/sdapi/v1/txt2img", json=body)))
    worker.start()
    wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2, what="first run")
    assert client.post("/sdapi/v1/skip").json() == {}
    worker.join(120)
    response = out["r"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["all_seeds"] == [5, 6] and len(response.json()["images"]) == 2
    job = next(j for j in server.state.queue.store.jobs() if j.request.prompt == "skip me")
    steps = [e["data"]["step"] for e in job.events if e["event"] == "step"]
    assert steps[-1] == 80 and len(steps) < 80  # the second run ran all 40 steps, the first did not


def test_readyz_is_503_until_the_engines_are_loaded(tiny_engine_dir):
    from sdrt.serve.executor import LocalExecutor

    executor = LocalExecutor(str(tiny_engine_dir), threads=1)
    srv = ThreadServer(executor)
    try:
        not_ready = httpx.get(f"{srv.url}/readyz", timeout=30)
        assert not_ready.status_code == 503 and not_ready.json()["error"] == "Unavailable"
        executor.warm_up()
        assert httpx.get(f"{srv.url}/readyz", timeout=30).status_code == 200
    finally:
        srv.close()
    assert srv.state.closed and not executor.ready()  # the lifespan's shutdown drained and closed it
