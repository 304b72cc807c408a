"""Bad input over HTTP -> 4xx JSON {error, detail}, never a 500 or a traceback, and the server stays
healthy; auth (Basic and Bearer, 401 + WWW-Authenticate); refusals of the ``sdrt serve`` command itself;
``import sdrt`` / ``sdrt.cli`` without the serving stack."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from tests.serve_fixtures import PROMPT, ThreadServer, b64_png

pytest.importorskip("fastapi")
AUTH = {"Authorization": "Bearer good-token"}
GOOD = {"prompt": PROMPT, "steps": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tiny_engine_dir):
    from sdrt.serve.app import ServeOptions
    from sdrt.serve.executor import LocalExecutor

    executor = LocalExecutor(str(tiny_engine_dir), threads=1)
    executor.warm_up()
    srv = ThreadServer(executor, ServeOptions(users={"u": "p"}, tokens=("good-token",), max_body_bytes=2 << 20,
                                              max_prompt_chars=1000, max_image_pixels=4096 * 4096))
    yield srv
    srv.close()


def _bomb() -> str:
    """8000x8000 black PNG: 64 M pixels in ~60 kB."""
    out = io.BytesIO()
    Image.new("L", (8000, 8000), 0).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


IMG = b64_png(Image.new("RGB", (64, 64), (120, 30, 200)))
MASK_96 = b64_png(Image.new("L", (96, 96), 255))
I2I = {**GOOD, "init_images": [IMG]}
CORPUS = [  # (id, method, path, json body or raw bytes, headers, expected status, word in detail)
    ("malformed-json", "POST", "/sdapi/v1/txt2img", b"{bad", AUTH, 400, "malformed"),
    ("not-utf8", "POST", "/sdapi/v1/txt2img", b"\xff\xfe\x00", AUTH, 400, "malformed"),
    ("json-array", "POST", "/sdapi/v1/txt2img", b"[]", AUTH, 400, "object"),
    ("steps-type", "POST", "/sdapi/v1/txt2img", {**GOOD, "steps": "many"}, AUTH, 400, "steps"),
    ("cfg-type", "POST", "/sdapi/v1/txt2img", {**GOOD, "cfg_scale": "7"}, AUTH, 400, "cfg_scale"),
    ("cfg-range", "POST", "/sdapi/v1/txt2img", {**GOOD, "cfg_scale": -1}, AUTH, 400, "cfg_scale"),
    ("seed-type", "POST", "/sdapi/v1/txt2img", {**GOOD, "seed": "x"}, AUTH, 400, "seed"),
    ("steps-zero", "POST", "/sdapi/v1/txt2img", {**GOOD, "steps": 0}, AUTH, 400, "steps"),
    ("steps-over-max", "POST", "/sdapi/v1/txt2img", {**GOOD, "steps": 151}, AUTH, 400, "steps"),
    ("width-odd", "POST", "/sdapi/v1/txt2img", {**GOOD, "width": 65}, AUTH, 400, "width"),
    ("width-huge", "POST", "/sdapi/v1/txt2img", {**GOOD, "width": 4096}, AUTH, 400, "width"),
    ("height-negative", "POST", "/sdapi/v1/txt2img", {**GOOD, "height": -64}, AUTH, 400, "height"),
    ("batch-over-artifact", "POST", "/sdapi/v1/txt2img", {**GOOD, "batch_size": 3}, AUTH, 400, "batch_size"),
    ("too-many-images", "POST", "/sdapi/v1/txt2img", {**GOOD, "n_iter": 100}, AUTH, 400, "n_iter"),
    ("unknown-sampler", "POST", "/sdapi/v1/txt2img", {**GOOD, "sampler_name": "Nope"}, AUTH, 400, "sampler_name"),
    ("unknown-schedule", "POST", "/sdapi/v1/txt2img", {**GOOD, "scheduler": "Exponential"}, AUTH, 400, "scheduler"),
    ("hires-fix", "POST", "/sdapi/v1/txt2img", {**GOOD, "enable_hr": True}, AUTH, 400, "enable_hr"),
    ("restore-faces", "POST", "/sdapi/v1/txt2img", {**GOOD, "restore_faces": True}, AUTH, 400, "restore_faces"),
    ("tiling", "POST", "/sdapi/v1/txt2img", {**GOOD, "tiling": True}, AUTH, 400, "tiling"),
    ("script", "POST", "/sdapi/v1/txt2img", {**GOOD, "script_name": "x/y/z plot"}, AUTH, 400, "script_name"),
    ("alwayson", "POST", "/sdapi/v1/txt2img", {**GOOD, "alwayson_scripts": {"ADetailer": {"args": [True]}}}, AUTH,
     400, "alwayson_scripts"),
    ("subseed", "POST", "/sdapi/v1/txt2img", {**GOOD, "subseed_strength": 0.3}, AUTH, 400, "subseed_strength"),
    ("styles", "POST", "/sdapi/v1/txt2img", {**GOOD, "styles": ["cinematic"]}, AUTH, 400, "styles"),
    ("eta-ddim", "POST", "/sdapi/v1/txt2img", {**GOOD, "sampler_name": "DDIM", "eta": 0.5}, AUTH, 400, "eta"),
    ("override-model", "POST", "/sdapi/v1/txt2img", {**GOOD, "override_settings": {"sd_model_checkpoint": "other"}},
     AUTH, 400, "sd_model_checkpoint"),
    ("prompt-too-long", "POST", "/sdapi/v1/txt2img", {**GOOD, "prompt": "cat " * 400}, AUTH, 400, "prompt"),
    ("garbage-base64", "POST", "/sdapi/v1/img2img", {**I2I, "init_images": ["!!!not base64"]}, AUTH, 400, "base64"),
    ("not-an-image", "POST", "/sdapi/v1/img2img", {**I2I, "init_images": ["aGVsbG8gd29ybGQ="]}, AUTH, 400, "image"),
    ("url-not-fetched", "POST", "/sdapi/v1/img2img", {**I2I, "init_images": ["http://127.0.0.1:1/x.png"]}, AUTH,
     400, "URL"),
    ("png-bomb", "POST", "/sdapi/v1/img2img", {**I2I, "init_images": [_bomb()]}, AUTH, 400, "bomb"),
    ("no-init-images", "POST", "/sdapi/v1/img2img", GOOD, AUTH, 400, "init_images"),
    ("mask-size", "POST", "/sdapi/v1/img2img", {**I2I, "mask": MASK_96}, AUTH, 400, "mask"),
    ("resize-mode", "POST", "/sdapi/v1/img2img", {**I2I, "resize_mode": 2}, AUTH, 400, "resize_mode"),
    ("latent-noise-fill", "POST", "/sdapi/v1/img2img", {**I2I, "mask": IMG, "inpainting_fill": 2}, AUTH, 400,
     "inpainting_fill"),
    ("strength-range", "POST", "/sdapi/v1/img2img", {**I2I, "denoising_strength": 1.5}, AUTH, 400, "strength"),
    ("strength-zero", "POST", "/sdapi/v1/img2img", {**I2I, "denoising_strength": 0}, AUTH, 400,
     "denoising_strength"),
    ("mask-round-off", "POST", "/sdapi/v1/img2img", {**I2I, "mask": IMG, "mask_round": False}, AUTH, 400,
     "mask_round"),
    ("png-info-garbage", "POST", "/sdapi/v1/png-info", {"image": "@@@"}, AUTH, 400, "base64"),
    ("options-model", "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "other"}, AUTH, 400, "sd_model_checkpoint"),
    ("job-unknown-field", "POST", "/v1/jobs", {**GOOD, "frames": 3}, AUTH, 422, "frames"),
    ("job-bad-mode", "POST", "/v1/jobs", {**GOOD, "mode": "video"}, AUTH, 422, "mode"),
    ("job-no-prompt", "POST", "/v1/jobs", {"steps": 1}, AUTH, 422, "prompt"),
    ("job-batch-zero", "POST", "/v1/jobs", {**GOOD, "batch": 0}, AUTH, 422, "batch"),
    ("job-bad-scheduler", "POST", "/v1/jobs", {**GOOD, "scheduler": "Magic"}, AUTH, 400, "scheduler"),
    ("job-inpaint-no-mask", "POST", "/v1/jobs", {**GOOD, "mode": "inpaint", "image": IMG}, AUTH, 400, "mask"),
    ("openai-size", "POST", "/v1/images/generations", {"prompt": PROMPT, "size": "big"}, AUTH, 400, "size"),
    ("openai-size-range", "POST", "/v1/images/generations", {"prompt": PROMPT, "size": "1024x1024"}, AUTH, 400,
     "size: '1024x1024'"),
    ("openai-n", "POST", "/v1/images/generations", {"prompt": PROMPT, "n": 11}, AUTH, 422, "n"),
    ("openai-url", "POST", "/v1/images/generations", {"prompt": PROMPT, "response_format": "url"}, AUTH, 400,
     "response_format"),
    ("openai-model", "POST", "/v1/images/generations", {"prompt": PROMPT, "model": "dall-e-3"}, AUTH, 400, "model"),
    ("body-too-large", "POST", "/sdapi/v1/txt2img", b"{" + b" " * (3 << 20) + b"}", AUTH, 413, "limit"),
    ("no-auth", "POST", "/sdapi/v1/txt2img", GOOD, {}, 401, "credentials"),
    ("wrong-bearer", "GET", "/sdapi/v1/samplers", None, {"Authorization": "Bearer nope"}, 401, "credentials"),
    ("garbage-basic", "GET", "/sdapi/v1/samplers", None, {"Authorization": "Basic %%%"}, 401, "credentials"),
    ("wrong-basic", "GET", "/v1/jobs/x", None, {"Authorization": "Basic " + base64.b64encode(b"u:x").decode()}, 401,
     "credentials"),
    ("metrics-needs-auth", "GET", "/metrics", None, {}, 401, "credentials"),
    ("unknown-route", "GET", "/nope", None, AUTH, 404, ""),
    ("wrong-method", "GET", "/sdapi/v1/txt2img", None, AUTH, 405, ""),
    ("unknown-job", "GET", "/v1/jobs/0123", None, AUTH, 404, "job"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_is_a_4xx_json_error(server, case):
    _, method, path, body, headers, status, word = case
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    response = httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text[:500]
    payload = response.json()
    assert set(payload) == {"error", "detail"} and isinstance(payload["detail"], str), payload
    assert word.lower() in payload["detail"].lower(), payload
    assert "Traceback" not in response.text and 'File "' not in response.text
    if status == 401:
        challenges = response.headers.get_list("www-authenticate")
        assert any(c.startswith("Basic") for c in challenges) and any(c.startswith("Bearer") for c in challenges)


def test_server_healthy_after_the_corpus(server):
    for case in CORPUS[:5]:
        test_bad_input_is_a_4xx_json_error(server, case)
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"  # open without credentials
    ok = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=GOOD, auth=("u", "p"), timeout=60)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    assert ok.headers["x-sdrt-replica"]
    assert httpx.get(f"{server.url}/readyz", headers=AUTH).status_code == 200


def _sdrt(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sdrt.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_public_bind_without_auth(tiny_engine_dir, tmp_path):
    proc = _sdrt("serve", "--engines", str(tiny_engine_dir), "--host", "0.0.0.0", "--port", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sdrt serve: error: refusing to bind 0.0.0.0 (not a loopback address) without --api-auth or --token-file"]
    bad_auth = _sdrt("serve", "--engines", str(tiny_engine_dir), "--api-auth", "nopassword")
    assert bad_auth.returncode == 2 and len(bad_auth.stderr.strip().splitlines()) == 1
    missing = _sdrt("serve", "--engines", str(tmp_path / "none"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_import_sdrt_does_not_load_the_serving_stack():
    code = ("import sys, sdrt, sdrt.cli, sdrt.pipeline; sdrt.cli.build_parser(); import json; print(json.dumps("
            "sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', "
            "'prometheus_client', 'ray', 'pydantic'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_metrics_label_routes_by_template(server):
    """Route labels are the matched route's template: the OpenAI route keeps its name, and job ids a client
    makes up do not each become a new label value."""
    for job_id in ("made-up-1", "made-up-2"):
        assert httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).status_code == 404
    assert httpx.post(f"{server.url}/v1/images/generations", json={"prompt": PROMPT, "size": "big"},
                      headers=AUTH).status_code == 400
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert "made-up" not in metrics
    assert 'route="/v1/jobs/{job_id}",status="404"' in metrics
    assert 'route="/v1/images/generations",status="400"' in metrics
