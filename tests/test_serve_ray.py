"""``sdrt serve --ray --replicas 2`` on the tiny model, on 127.0.0.1: the A1111 and jobs endpoints give the
Python API's pixels, responses name their Ray replica (two distinct ones), cancel reaches the replica,
a replica killed mid-request fails that request with a 503 JSON and is restarted by Ray, and SIGTERM
stops every process the server started. One server for the module (Ray's start is the slow part)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'sdrt[ray]'")
requests = pytest.importorskip("requests")

from ray_server import MODEL_REPLICA, START_S, Server, is_loopback, listening  # noqa: E402 (after the skips)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REQUEST_S = 120
FINISHED = ("succeeded", "failed", "cancelled")
LONG = 900  # steps of a request that runs long enough to be cancelled or killed (the tiny model has 1000)


@pytest.fixture(scope="module")
def server(tiny_engine_dir, tmp_path_factory):
    srv = Server(tiny_engine_dir, tmp_path_factory.mktemp("ray_serve") / "server.log")
    try:
        srv.wait_ready()
        srv.track()
        yield srv
    finally:
        srv.stop(timeout=60)
        srv.kill_all()  # whatever SIGTERM left (test_sigterm_stops_every_ray_process checks it left nothing)


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    from sdrt.pipeline import Pipeline

    return Pipeline(tiny_engine_dir, threads=1)


def _a1111(server, seed, steps=4, size=64, timeout=REQUEST_S):
    body = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": steps, "cfg_scale": 7.0, "seed": seed,
            "width": size, "height": size, "sampler_name": "Euler a", "scheduler": "automatic"}
    return requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=timeout)


def _expected(pipe, seed, steps=4, size=64):
    return pipe.txt2img("a red apple", negative_prompt="blurry", steps=steps, guidance=7.0, seed=[seed],
                        width=size, height=size, scheduler="Euler a").images[0]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _job(server, steps, seed=11, size=64) -> str:
    body = {"mode": "txt2img", "prompt": "a red apple", "negative_prompt": "blurry", "steps": steps, "guidance": 7.0,
            "seed": seed, "width": size, "height": size, "scheduler": "Euler a"}
    response = requests.post(server.url + "/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait_job(server, job_id, until, timeout=REQUEST_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()
        if until(job):
            return job
        if job["state"] in FINISHED:
            pytest.fail(f"job {job_id} ended before the expected state: {job}")
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not reach the expected state within {timeout} s: {job}\n{server.output()}")


def test_every_ray_socket_listens_on_loopback(server):
    pids = [server.proc.pid, *server.track()]
    sockets = listening(pids)
    assert sockets, "found no listening socket of the server"
    assert [s for s in sockets if not is_loopback(s[1])] == []


def test_a1111_txt2img_pixels_and_replica_header(server, pipe):
    response = _a1111(server, seed=123)
    assert response.status_code == 200, response.text
    assert response.headers.get("X-Sdrt-Replica", "").startswith("sdrt#SdrtModel#")
    np.testing.assert_array_equal(_pixels(base64.b64decode(response.json()["images"][0])), _expected(pipe, 123))


def test_jobs_api_over_ray(server, pipe):
    job_id = _job(server, steps=4, seed=77)
    job = _wait_job(server, job_id, lambda j: j["state"] in FINISHED)
    assert job["state"] == "succeeded", job
    image = requests.get(f"{server.url}/v1/jobs/{job_id}/images/0.png", timeout=30)
    assert image.status_code == 200
    np.testing.assert_array_equal(_pixels(image.content), _expected(pipe, 77))
    events = requests.get(f"{server.url}/v1/jobs/{job_id}/events", timeout=30).text
    assert "step" in events and "done" in events


def test_openai_and_img2img_with_mask_over_ray(server):
    response = requests.post(server.url + "/v1/images/generations", timeout=REQUEST_S,
                             json={"prompt": "a red apple", "n": 1, "size": "64x64", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Sdrt-Replica"].startswith("sdrt#SdrtModel#")
    assert _pixels(base64.b64decode(response.json()["data"][0]["b64_json"])).shape == (64, 64, 3)

    def b64png(image) -> str:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"prompt": "a red apple", "init_images": [b64png(Image.new("RGB", (64, 64), (40, 90, 200)))],
            "mask": b64png(mask), "denoising_strength": 0.8, "steps": 4, "seed": 3, "width": 64, "height": 64,
            "sampler_name": "Euler a"}
    response = requests.post(server.url + "/sdapi/v1/img2img", json=body, timeout=REQUEST_S)
    assert response.status_code == 200, response.text
    assert response.headers["X-Sdrt-Replica"].startswith("sdrt#SdrtModel#")
    out = _pixels(base64.b64decode(response.json()["images"][0]))
    assert (out[:8, :8] == (40, 90, 200)).all()  # outside the (blurred) mask: the input's own pixels


def test_requests_spread_over_two_replicas(server):
    replicas, errors = set(), []

    def one(seed):
        response = _a1111(server, seed=seed, steps=30)
        if response.status_code == 200:
            replicas.add(response.headers["X-Sdrt-Replica"])
        else:
            errors.append(response.text)

    for _ in range(3):  # at most 3 rounds of 2 concurrent requests (both replicas are free between rounds)
        threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(REQUEST_S)
        if len(replicas) == 2:
            break
    assert not errors
    assert len(replicas) == 2, replicas
    assert len(server.model_replicas()) == 2


def test_cancel_stops_the_replica_at_its_next_step(server):
    job_id = _job(server, steps=LONG, size=128)
    _wait_job(server, job_id, lambda j: j["state"] == "running" and j["step"] >= 1)
    assert requests.post(f"{server.url}/v1/jobs/{job_id}/cancel", timeout=30).status_code in (200, 202)
    job = _wait_job(server, job_id, lambda j: j["state"] in FINISHED, timeout=60)
    assert job["state"] == "cancelled" and job["step"] < LONG, job
    # both replicas are free again: two concurrent requests finish
    done = [_job(server, steps=4, seed=s) for s in (5, 6)]
    for job_id in done:
        assert _wait_job(server, job_id, lambda j: j["state"] in FINISHED)["state"] == "succeeded"


def test_live_events_through_the_proxy_and_cancel(server):
    """SSE streams while the job runs (Ray's proxy does not buffer it); cancel ends the stream."""
    job_id = _job(server, steps=LONG, size=128)
    steps, seen = 0, []
    with requests.get(f"{server.url}/v1/jobs/{job_id}/events", stream=True, timeout=REQUEST_S) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                seen.append(line[7:])
                if seen[-1] == "step":
                    steps += 1
                    if steps == 3:
                        requests.post(f"{server.url}/v1/jobs/{job_id}/cancel", timeout=30)
                if seen[-1] in ("done", "error", "cancelled"):
                    break
            assert len(seen) < 5 * LONG, "the event stream did not end"
    assert steps >= 3 and seen[-1] == "cancelled", seen[-10:]
    assert _wait_job(server, job_id, lambda j: j["state"] in FINISHED)["step"] < LONG


def test_client_disconnect_cancels_on_the_replica(server):
    body = json.dumps({"prompt": "a red apple", "steps": LONG, "seed": 4, "width": 128, "height": 128}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + REQUEST_S
    while True:
        progress = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()
        if progress["current_task"] and progress["state"]["sampling_step"] >= 1:
            break
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.1)
    sock.close()  # the client goes away mid-generation
    job = _wait_job(server, progress["current_task"], lambda j: j["state"] in FINISHED)
    assert job["state"] == "cancelled" and job["step"] < LONG, job
    assert _a1111(server, seed=5).status_code == 200


def test_a1111_interrupt_reaches_the_replica(server):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", _a1111(server, seed=8, steps=LONG, size=128)))
    thread.start()
    deadline = time.monotonic() + REQUEST_S
    while requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline and thread.is_alive(), "the request never started"
        time.sleep(0.1)
    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=30).status_code == 200
    thread.join(REQUEST_S)
    assert not thread.is_alive(), "interrupt did not stop the replica"
    response = out["r"]
    assert response.status_code == 200, response.text  # A1111: the partly denoised image
    assert len(response.json()["images"]) == 1 and response.headers["X-Sdrt-Replica"].startswith("sdrt#SdrtModel#")


def test_a1111_skip_then_interrupt_over_ray(server):
    """skip ends the first image run on the replica, the second starts; interrupt ends that: 2 images."""
    body = {"prompt": "a red apple", "steps": LONG, "seed": 2, "width": 64, "height": 64, "n_iter": 2,
            "batch_size": 1, "sampler_name": "Euler a"}
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "r", requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=REQUEST_S)))
    thread.start()

    def wait_for(job_no) -> int:
        """Poll until image run ``job_no`` is under way; the highest step seen in the run before it."""
        deadline, before = time.monotonic() + REQUEST_S, 0
        while True:
            state = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()["state"]
            if state["job_no"] == job_no and state["sampling_step"] >= 1:
                return before
            if state["job_no"] == job_no - 1:
                before = max(before, state["sampling_step"])
            assert time.monotonic() < deadline and thread.is_alive(), f"image run {job_no} never started: {state}"
            time.sleep(0.05)

    wait_for(0)
    assert requests.post(server.url + "/sdapi/v1/skip", timeout=30).status_code == 200
    # the skipped run stops a step or two after the skip, far from its 900 steps
    assert wait_for(1) < LONG // 2
    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=30).status_code == 200
    thread.join(REQUEST_S)
    assert not thread.is_alive(), "skip/interrupt did not reach the replica"
    response = out["r"]
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 2


def test_killed_replica_fails_its_request_and_is_restarted(server, pipe):
    before = server.model_replicas()
    assert len(before) == 2
    sync: dict = {}

    def sync_request():
        sync["response"] = _a1111(server, seed=9, steps=LONG, size=128)

    job_id = _job(server, steps=LONG, seed=10, size=128)
    thread = threading.Thread(target=sync_request)
    thread.start()
    _wait_job(server, job_id, lambda j: j["state"] == "running" and j["step"] >= 1)
    deadline = time.monotonic() + REQUEST_S  # both generations running: one per replica (max_ongoing 1)
    while requests.get(server.url + "/readyz", timeout=30).json().get("running") != 2:
        assert time.monotonic() < deadline and thread.is_alive(), "the two requests never ran together"
        time.sleep(0.1)
    time.sleep(1.0)  # past its first steps on the other replica
    server.track()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + REQUEST_S  # the killed replica's request fails first (the other has far to go)
    while time.monotonic() < deadline:
        job = requests.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()
        if job["state"] in FINISHED or not thread.is_alive():
            break
        time.sleep(0.1)
    if job["state"] in FINISHED:  # the killed replica ran the job
        assert job["state"] == "failed" and job["error"]["status"] == 503, job
        assert job["error"]["error"] == "ReplicaFailed" and "died" in job["error"]["detail"], job
    else:  # it ran the synchronous request
        thread.join(1)
        response = sync.get("response")
        assert response is not None, f"neither request ended within {REQUEST_S} s after the kill"
        assert response.status_code == 503 and response.json()["error"] == "ReplicaFailed", response.text
        assert "Traceback" not in response.text
    # the survivor is stopped the A1111 way (both would otherwise run 900 steps)
    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=30).status_code == 200
    thread.join(REQUEST_S)
    assert not thread.is_alive(), "the synchronous request did not return after interrupt"
    job = _wait_job(server, job_id, lambda j: j["state"] in FINISHED)
    assert job["state"] in ("failed", "cancelled", "succeeded") and sync["response"].status_code in (200, 409, 503)
    failed = [job["state"] == "failed", sync["response"].status_code == 503]
    assert sum(failed) == 1, (job, sync["response"].status_code, sync["response"].text[:300])

    # Ray starts a new replica; later requests succeed, with the same pixels
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        current = server.model_replicas()
        if len(current) == 2 and victim not in current:
            break
        time.sleep(1)
    else:
        pytest.fail(f"Ray did not restart the killed replica within {START_S} s: {server.model_replicas()}")
    server.track()
    expected = _expected(pipe, 31)
    ok = 0
    for _ in range(20):  # bounded: requests routed before the router saw the new replica may be retried
        response = _a1111(server, seed=31)
        if response.status_code == 200:
            np.testing.assert_array_equal(_pixels(base64.b64decode(response.json()["images"][0])), expected)
            ok += 1
            if ok == 3:
                break
        else:
            assert response.status_code == 503, response.text
            time.sleep(1)
    assert ok == 3


def test_sigterm_drains_and_stops_every_ray_process(server):
    """SIGTERM with a request running: it finishes (drain), new jobs get 503, the server exits 0 and
    every process it started (Ray's GCS, raylet, workers, replicas) is gone."""
    started = server.track()
    assert any(cmd.startswith(MODEL_REPLICA) for cmd in started.values())
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", _a1111(server, seed=6, steps=300)))
    thread.start()
    deadline = time.monotonic() + REQUEST_S
    while requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline and thread.is_alive(), "the request never started"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    refused = None
    for _ in range(100):  # bounded: the drain starts within about a second of the signal
        body = {"mode": "txt2img", "prompt": "late", "steps": 4, "seed": 1, "width": 64, "height": 64}
        refused = requests.post(server.url + "/v1/jobs", json=body, timeout=30)
        if refused.status_code != 202 or not thread.is_alive():
            break
        time.sleep(0.1)
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"], refused.text
    thread.join(REQUEST_S)
    assert out["r"].status_code == 200, out["r"].text  # drained: it ran to the end (--drain-timeout 60)
    code = server.stop()
    assert code == 0, server.output()
    assert server.alive() == [], server.output()


def test_port_in_use_is_one_line_before_ray_starts(tiny_engine_dir):
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", "--engines", str(tiny_engine_dir), "--port",
                              str(port), "--ray", "--replicas", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0] and "Traceback" not in run.stderr, run.stderr


def test_app_builder_checks_its_args(tiny_engine_dir):
    """``serve run/deploy`` entry point: the same checks as the flags (no cluster needed to build)."""
    from sdrt.errors import InputError
    from sdrt.serve.ray_app import app_builder

    with pytest.raises(InputError, match="engines"):
        app_builder({})
    with pytest.raises(InputError, match="loopback"):
        app_builder({"engines": str(tiny_engine_dir), "host": "0.0.0.0"})
    with pytest.raises(InputError, match="MIN:MAX"):
        app_builder({"engines": str(tiny_engine_dir), "autoscale": "4"})
    from ray.serve import Application

    assert isinstance(app_builder({"engines": str(tiny_engine_dir), "host": "0.0.0.0", "api_auth": "u:p",
                                   "autoscale": "1:3", "num_gpus": 0}), Application)


def test_ray_flags_reach_the_deployment_settings():
    """``sdrt serve``'s Ray flags -> RaySettings: replicas or autoscaling, resources, in-flight slots."""
    from sdrt.cli import build_parser
    from sdrt.errors import InputError
    from sdrt.serve.ray_app import settings_from_args

    def settings(*flags):
        return settings_from_args(build_parser().parse_args(["serve", "--engines", "e", "--ray", *flags]))

    fixed = settings("--replicas", "3", "--ray-num-cpus", "2", "--ray-max-ongoing", "2")
    assert (fixed.replicas, fixed.num_cpus, fixed.replica_threads, fixed.concurrency) == (3, 2.0, 2, 6)
    scaled = settings("--ray-autoscale", "1:4", "--ray-num-gpus", "1", "--threads", "3")
    assert (scaled.autoscale, scaled.num_gpus, scaled.replica_threads, scaled.concurrency) == ((1, 4), 1.0, 3, 4)
    for bad in (["--ray-autoscale", "3:1"], ["--ray-autoscale", "x"], ["--ray-max-ongoing", "0"],
                ["--ray-num-gpus", "-1"]):
        with pytest.raises(InputError):
            settings(*bad)
