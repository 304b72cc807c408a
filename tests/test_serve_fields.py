"""sdrt serve's request fields beyond the first API version (sdrt/serve/extras.py), on an in-process server:
``rng`` in the jobs API, the OpenAI endpoint and the A1111 endpoints (A1111's ``randn_source`` too), each
giving the Python API's pixels for the same request; bad values are 4xx JSON naming the field."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from sdrt.pipeline import Pipeline
from tests.serve_fixtures import PROMPT, ThreadServer, pixels, png_text, wait_until

pytest.importorskip("fastapi")

FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    """--lora-dir with one random kohya LoRA (UNet + text encoder) as sub/kohya_te.safetensors."""
    from sdrt_export.lora_random import write_random_lora

    root = tmp_path_factory.mktemp("serve-loras")
    (root / "sub").mkdir()
    write_random_lora(tiny_model_dir, root / "sub" / "kohya_te.safetensors", "kohya", ("unet", "text_encoder"),
                      rank=4, alpha=2.0, seed=1)
    return root


@pytest.fixture(scope="module")
def server(tiny_engine_dir, lora_dir):
    from sdrt.serve.app import ServeOptions
    from sdrt.serve.executor import LocalExecutor

    executor = LocalExecutor(str(tiny_engine_dir), threads=1)
    executor.warm_up()
    srv = ThreadServer(executor, ServeOptions(lora_dir=str(lora_dir)))
    yield srv
    srv.close()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=1)


def job_images(client, body: dict) -> list[bytes]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    status = wait_until(lambda: (s := client.get(f"/v1/jobs/{job_id}").json())["state"] in
                        ("succeeded", "failed", "cancelled") and s, 120, 0.05, "job end")
    assert status["state"] == "succeeded", status
    return [client.get(url).content for url in status["image_urls"]]


def test_jobs_rng_cuda_equals_pipeline(client, pipe):
    """rng=cuda gives Pipeline(rng="cuda")'s pixels (ancestral sampler: every step draws from the generator),
    differs from the CPU generator's image, and the PNG records A1111's RNG: NV."""
    body = {"prompt": PROMPT, "seed": 5, "scheduler": "Euler a", "batch": 2, **FAST}
    cuda = job_images(client, {**body, "rng": "cuda"})
    expected = pipe.txt2img(PROMPT, seed=[5, 6], batch=2, scheduler="Euler a", rng="cuda", **FAST).images
    for png, image in zip(cuda, expected, strict=True):
        np.testing.assert_array_equal(pixels(png), image)
    cpu = job_images(client, {**body, "batch": 1})
    np.testing.assert_array_equal(pixels(cpu[0]), pipe.txt2img(PROMPT, seed=5, scheduler="Euler a", **FAST).images[0])
    assert not np.array_equal(pixels(cpu[0]), pixels(cuda[0]))
    assert "RNG: NV" in png_text(cuda[0]) and "sdrt RNG: cuda:h100" in png_text(cuda[0])
    assert "RNG: CPU" in png_text(cpu[0]) and "sdrt RNG" not in png_text(cpu[0])
    a100 = job_images(client, {**body, "batch": 1, "rng": "CUDA:A100"})  # any spelling parse_rng takes
    np.testing.assert_array_equal(pixels(a100[0]), expected[0])  # 64x64 latents: below every GPU's T_max
    assert "sdrt RNG: cuda:a100" in png_text(a100[0])


def a1111(client, **payload) -> dict:
    body = {"prompt": PROMPT, "seed": 9, "sampler_name": "Euler a", "cfg_scale": 7.5, **FAST, **payload}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a1111_randn_source_and_rng(client, pipe):
    """override_settings.randn_source NV and GPU are torch's CUDA generator (sdrt's cuda), CPU the CPU one;
    sdrt's own rng field names the GPU; POST /options randn_source sets the endpoints' default."""
    common = dict(scheduler="Euler a", **FAST)
    cuda = pipe.txt2img(PROMPT, seed=[9, 10], batch=2, rng="cuda", **common).images
    cpu = pipe.txt2img(PROMPT, seed=9, **common).images[0]
    nv = a1111(client, batch_size=2, override_settings={"randn_source": "NV"})
    for b64, image in zip(nv["images"], cuda, strict=True):
        np.testing.assert_array_equal(pixels(b64), image)
    assert "RNG: NV" in json.loads(nv["info"])["infotexts"][0]
    assert "RNG: NV" in png_text(base64.b64decode(nv["images"][0]))
    gpu = a1111(client, override_settings={"randn_source": "GPU"})
    np.testing.assert_array_equal(pixels(gpu["images"][0]), cuda[0])
    np.testing.assert_array_equal(pixels(a1111(client, override_settings={"randn_source": "CPU"})["images"][0]), cpu)
    np.testing.assert_array_equal(pixels(a1111(client, rng="cuda:4090")["images"][0]), cuda[0])
    assert client.get("/sdapi/v1/options").json()["randn_source"] == "CPU"  # sdrt's default
    try:
        assert client.post("/sdapi/v1/options", json={"randn_source": "NV"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["randn_source"] == "NV"
        np.testing.assert_array_equal(pixels(a1111(client)["images"][0]), cuda[0])
        np.testing.assert_array_equal(pixels(a1111(client, override_settings={"randn_source": "CPU"})["images"][0]),
                                      cpu)  # the request's override wins over the option
    finally:
        assert client.post("/sdapi/v1/options", json={"randn_source": "CPU"}).status_code == 200
    np.testing.assert_array_equal(pixels(a1111(client)["images"][0]), cpu)


def test_openai_rng(client, pipe):
    response = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "steps": 3, "seed": 2,
                                                           "scheduler": "Euler a", "rng": "cuda"})
    assert response.status_code == 200, response.text
    expected = pipe.txt2img(PROMPT, seed=2, scheduler="Euler a", rng="cuda", **FAST).images[0]
    np.testing.assert_array_equal(pixels(response.json()["data"][0]["b64_json"]), expected)


BAD = [  # (route, payload, status, needles)
    ("/v1/jobs", {"rng": "tpu"}, 400, ["rng:", "cpu, cuda or cuda:GPU", "'tpu'"]),
    ("/v1/jobs", {"rng": "cuda:voodoo5"}, 400, ["rng:", "unknown GPU", "voodoo5", "h100"]),
    ("/v1/jobs", {"rng": "cuda:sm=0"}, 400, ["rng:", "sm must be in"]),
    ("/v1/jobs", {"rng": "cuda:sm=x"}, 400, ["rng:", "takes integers"]),
    ("/v1/jobs", {"rng": 1}, 422, ["rng"]),
    ("/v1/images/generations", {"rng": "gpu"}, 400, ["rng:", "'gpu'"]),
    ("/sdapi/v1/txt2img", {"rng": "tpu"}, 400, ["rng:", "'tpu'"]),
    ("/sdapi/v1/txt2img", {"rng": ["cuda"]}, 400, ["rng: expected a string"]),
    ("/sdapi/v1/txt2img", {"override_settings": {"randn_source": "XPU"}}, 400,
     ["override_settings.randn_source", "'XPU'", "CPU, GPU or NV"]),
    ("/sdapi/v1/txt2img", {"override_settings": {"randn_source": 1}}, 400, ["override_settings.randn_source"]),
    ("/sdapi/v1/txt2img", {"rng": "cpu", "override_settings": {"randn_source": "NV"}}, 400, ["contradicts"]),
    ("/sdapi/v1/img2img", {"rng": "cuda:", "override_settings": {"randn_source": "CPU"}}, 400, ["contradicts"]),
    ("/sdapi/v1/options", {"randn_source": "cuda"}, 400, ["randn_source", "CPU, GPU or NV"]),
]


@pytest.mark.parametrize("route, payload, status, needles", BAD, ids=[f"{r}-{json.dumps(p)}" for r, p, *_ in BAD])
def test_bad_rng_is_4xx_naming_the_field(client, route, payload, status, needles):
    body = dict(payload) if route.endswith("options") else {"prompt": PROMPT, "steps": 1, **payload}
    if route.endswith("img2img"):
        body["init_images"] = [base64.b64encode(b"not checked before the rng").decode()]
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    assert client.get("/sdapi/v1/options").json()["randn_source"] == "CPU"  # a refused option changes nothing


@pytest.fixture(scope="module")
def cn_server(tiny_model_dir, tmp_path_factory):
    from sdrt.serve.executor import LocalExecutor
    from tests.serve_fixtures import controlnet_artifact

    executor = LocalExecutor(str(controlnet_artifact(tiny_model_dir, tmp_path_factory)), threads=1)
    executor.warm_up()
    srv = ThreadServer(executor)
    yield srv
    srv.close()


def test_jobs_controlnet_equals_pipeline(cn_server):
    """control_images (base64, any size: the pipeline resizes), control_scales, start/end, guess_mode give
    Pipeline's pixels; the control image changes the result; img2img takes them too."""
    from tests.serve_fixtures import b64_png, control_picture

    pipe = cn_server.executor.pipe
    a, b = control_picture(64, 64, 1), control_picture(80, 48, 2)
    common = {"prompt": PROMPT, "seed": 3, "scheduler": "Euler a", **FAST}
    control = {"control_scales": [0.7], "control_start": 0.0, "control_end": 0.75, "guess_mode": True}
    with httpx.Client(base_url=cn_server.url, timeout=120) as client:
        got = job_images(client, {**common, "control_images": [b64_png(a)], **control})
        other = job_images(client, {**common, "control_images": [b64_png(b)], "control_scales": 1.5})
        plain = job_images(client, common)
        image = control_picture(64, 64, 7)
        i2i = job_images(client, {**common, "mode": "img2img", "image": b64_png(image), "strength": 0.7,
                                  "control_images": ["data:image/png;base64," + b64_png(a)]})
    want = pipe.txt2img(PROMPT, seed=3, scheduler="Euler a", control_images=[a], **control, **FAST).images[0]
    np.testing.assert_array_equal(pixels(got[0]), want)
    np.testing.assert_array_equal(pixels(other[0]), pipe.txt2img(PROMPT, seed=3, scheduler="Euler a",
                                                                 control_images=[b], control_scales=1.5,
                                                                 **FAST).images[0])
    np.testing.assert_array_equal(pixels(plain[0]), pipe.txt2img(PROMPT, seed=3, scheduler="Euler a",
                                                                 **FAST).images[0])
    np.testing.assert_array_equal(pixels(i2i[0]), pipe.img2img(image, PROMPT, strength=0.7, seed=3,
                                                               scheduler="Euler a", control_images=[a],
                                                               **FAST).images[0])
    assert not np.array_equal(pixels(got[0]), pixels(other[0]))
    assert not np.array_equal(pixels(got[0]), pixels(plain[0]))


CN_BAD = [  # (payload, needles); the artifact has one ControlNet
    ({"control_images": ["A", "B"]}, ["control_images: 2 image(s) for the 1 ControlNet(s)"]),
    ({"control_images": ["not base64!"]}, ["control_images[0]", "base64"]),
    ({"control_images": ["ok"], "control_scales": [1.0, 2.0]}, ["control_scales: 2 scale(s) for 1"]),
    ({"control_images": ["ok"], "control_start": 0.5, "control_end": 0.5}, ["0 <= start < end <= 1"]),
    ({"control_images": ["ok"], "control_end": 1.5}, ["control_start / control_end"]),
    ({"control_scales": 0.5}, ["control_scales: given without control_images"]),
    ({"guess_mode": True}, ["guess_mode: given without control_images"]),
]


@pytest.mark.parametrize("payload, needles", CN_BAD, ids=[json.dumps(p) for p, _ in CN_BAD])
def test_bad_control_fields_are_400(cn_server, payload, needles):
    from tests.serve_fixtures import b64_png, control_picture

    ok = b64_png(control_picture(64, 64, 1))
    payload = {k: ([ok if i == "ok" else i for i in v] if k == "control_images" else v) for k, v in payload.items()}
    with httpx.Client(base_url=cn_server.url, timeout=60) as client:
        response = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 1, **payload})
    assert response.status_code == 400, response.text
    for needle in needles:
        assert needle in response.json()["detail"], (needle, response.json())


def test_control_images_on_an_artifact_without_controlnet(client):
    from tests.serve_fixtures import b64_png, control_picture

    response = client.post("/v1/jobs", json={"prompt": PROMPT, "control_images": [b64_png(control_picture(8, 8, 1))]})
    assert response.status_code == 400 and "has no ControlNet" in response.json()["detail"], response.text


def test_loras_jobs_field_and_a1111_prompt_tags(client, pipe, lora_dir):
    """The jobs API's loras and A1111's <lora:NAME:WEIGHT> tags (resolved in --lora-dir, below it too) give
    Pipeline(loras=...)'s pixels; a request without LoRA afterwards gives the base model's pixels again."""
    path = str(lora_dir / "sub" / "kohya_te.safetensors")
    common = {"prompt": PROMPT, "seed": 6, "scheduler": "Euler a", **FAST}
    with_lora = job_images(client, {**common, "loras": [["kohya_te", 0.8]]})
    as_object = job_images(client, {**common, "loras": [{"name": "kohya_te", "weight": 0.8}]})
    base = job_images(client, common)
    want = pipe.txt2img(PROMPT, seed=6, scheduler="Euler a", loras=[(path, 0.8)], **FAST).images[0]
    np.testing.assert_array_equal(pixels(with_lora[0]), want)
    np.testing.assert_array_equal(pixels(as_object[0]), want)
    np.testing.assert_array_equal(pixels(base[0]), pipe.txt2img(PROMPT, seed=6, scheduler="Euler a",
                                                                **FAST).images[0])
    assert not np.array_equal(pixels(with_lora[0]), pixels(base[0]))
    text = png_text(with_lora[0])
    assert text.startswith(PROMPT + " <lora:kohya_te:0.8>\n") and "Lora hashes: " in text, text
    tagged = f"{PROMPT} <lora:kohya_te:0.8>"
    got = a1111(client, prompt=tagged, seed=6)
    np.testing.assert_array_equal(pixels(got["images"][0]), pipe.txt2img(
        tagged, seed=6, scheduler="Euler a", guidance=7.5, lora_dir=lora_dir, **FAST).images[0])
    np.testing.assert_array_equal(pixels(got["images"][0]), want)  # the tag is removed before tokenizing
    assert json.loads(got["info"])["infotexts"][0].startswith(tagged + "\n")
    listed = client.get("/sdapi/v1/loras").json()
    assert [(e["name"], e["path"]) for e in listed] == [("kohya_te", path)]


LORA_BAD = [  # (route, payload, needles)
    ("/v1/jobs", {"loras": [["nope", 1.0]]}, ["loras:", "no nope.safetensors"]),
    ("/v1/jobs", {"loras": [["../sub/kohya_te", 1.0]]}, ["loras:", "no path"]),
    ("/v1/jobs", {"loras": [["kohya_te", "heavy"]]}, ["loras[0]: the weight must be a number"]),
    ("/v1/jobs", {"loras": [["kohya_te", 1.0, 2.0]]}, ["loras[0]: expected [NAME, WEIGHT]"]),
    ("/v1/jobs", {"loras": "kohya_te"}, ["loras"]),
    ("/v1/jobs", {"prompt": "a cat <lora:nope:1>"}, ["prompt:", "no nope.safetensors"]),
    ("/sdapi/v1/txt2img", {"prompt": "a cat <lora:kohya_te:x>"}, ["prompt:", "not a number"]),
    ("/sdapi/v1/txt2img", {"prompt": "a cat <lora:/etc/passwd:1>"}, ["prompt:", "no path"]),
    ("/v1/images/generations", {"prompt": "a cat <lora:kohya_te:1:2>"}, ["prompt:", "<lora:NAME:WEIGHT>"]),
]


@pytest.mark.parametrize("route, payload, needles", LORA_BAD, ids=[f"{r}-{json.dumps(p)}" for r, p, _ in LORA_BAD])
def test_bad_loras_are_400(client, route, payload, needles):
    response = client.post(route, json={"prompt": PROMPT, "steps": 1, **payload})
    assert response.status_code in (400, 422), response.text
    assert response.status_code == 400 or payload["loras"] == "kohya_te"
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, (needle, detail)


def test_loras_need_a_lora_dir(cn_server):
    with httpx.Client(base_url=cn_server.url, timeout=60) as client:
        for route, body in (("/v1/jobs", {"loras": [["kohya_te", 1]]}), ("/sdapi/v1/txt2img", {"prompt": "<lora:a>"})):
            response = client.post(route, json={"prompt": PROMPT, **body})
            assert response.status_code == 400 and "--lora-dir" in response.json()["detail"], response.text


@pytest.fixture(scope="module")
def k22_server(tmp_path_factory):
    from sdrt.serve.executor import LocalExecutor
    from tests.serve_fixtures import kandinsky_artifact

    executor = LocalExecutor(str(kandinsky_artifact(tmp_path_factory)), threads=1)
    executor.warm_up()
    srv = ThreadServer(executor)
    yield srv
    srv.close()


def test_kandinsky_txt2img_on_every_endpoint(k22_server):
    """A Kandinsky 2.2 artifact: jobs API (prior_steps, prior_guidance), A1111 and OpenAI txt2img give the
    Pipeline's pixels; the steps and guidance a request leaves out are the family's (100, 4.0)."""
    pipe = k22_server.executor.pipe
    assert k22_server.executor.manifest_info["defaults"]["steps"] == 100
    kw = {"prior_steps": 3, "prior_guidance": 5.0, "steps": 2, "guidance": 3.0, "width": 64, "height": 64}
    with httpx.Client(base_url=k22_server.url, timeout=120) as client:
        job = job_images(client, {"prompt": PROMPT, "seed": 8, "negative_prompt": "blurry", "batch": 2, **kw})
        webui = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 8, "cfg_scale": 3.0,
                                                       "negative_prompt": "blurry", **kw}).json()
        openai = client.post("/v1/images/generations", json={
            "prompt": PROMPT, "size": "64x64", "seed": 8, "steps": 2, "guidance": 3.0, "prior_steps": 3,
            "prior_guidance": 5.0, "negative_prompt": "blurry"}).json()
        refused = client.post("/v1/jobs", json={"prompt": PROMPT, "control_images": ["x"]})
    want = pipe.txt2img(PROMPT, negative_prompt="blurry", seed=[8, 9], batch=2, **kw).images
    for png, image in zip(job, want, strict=True):
        np.testing.assert_array_equal(pixels(png), image)
    np.testing.assert_array_equal(pixels(webui["images"][0]), want[0])
    np.testing.assert_array_equal(pixels(openai["data"][0]["b64_json"]), want[0])
    assert refused.status_code == 400 and "has no ControlNet" in refused.json()["detail"]
    from sdrt.serve import openai_api
    from sdrt.serve.app import ServeOptions
    from sdrt.serve.schemas import OpenAIImagesIn

    plain = openai_api.build(OpenAIImagesIn(prompt=PROMPT, size="64x64"), k22_server.executor.manifest_info,
                             ServeOptions())
    assert (plain.steps, plain.guidance) == (100, 4.0)  # the family's, not the SD endpoint default 20 / 7.5
    from sdrt.serve.extras import family_defaults

    sd_info = {**k22_server.executor.manifest_info, "family": "sd15", "defaults": family_defaults("sd15")}
    plain = openai_api.build(OpenAIImagesIn(prompt=PROMPT, size="64x64"), sd_info, ServeOptions())
    assert (plain.steps, plain.guidance) == (20, 7.5)


def test_prior_fields_on_a_stable_diffusion_artifact_are_400(client):
    for route, body in (("/v1/jobs", {"prior_steps": 5}), ("/sdapi/v1/txt2img", {"prior_guidance": 2.0}),
                        ("/v1/images/generations", {"prior_steps": 5})):
        response = client.post(route, json={"prompt": PROMPT, **body})
        assert response.status_code == 400 and "only Kandinsky 2.2 artifacts have a prior" in \
            response.json()["detail"], response.text
