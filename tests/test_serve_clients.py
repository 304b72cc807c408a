"""Real clients against a real ``sdrt serve`` subprocess on 127.0.0.1 (Basic auth and a Bearer token on):
``webuiapi`` (txt2img, img2img with a mask, get_progress, interrupt, get_samplers, set_auth) and ``openai``
(images.generate). Pixels equal the Python API's for the same parameters and seed."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from sdrt.pipeline import Pipeline
from tests.serve_fixtures import PROMPT, SubprocessServer, pixels, wait_until, write_token

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")

USER, PASSWORD, TOKEN = "alice", "s3cret-pass", "tok-0123456789"


@pytest.fixture(scope="module")
def server(tiny_engine_dir, tmp_path_factory):
    token_file = write_token(tmp_path_factory.mktemp("auth") / "tokens", TOKEN)
    srv = SubprocessServer(tiny_engine_dir, "--api-auth", f"{USER}:{PASSWORD},bob:other", "--token-file",
                           str(token_file), "--threads", "1")
    with httpx.Client(auth=(USER, PASSWORD), timeout=30) as client:
        srv.wait_ready(client)
    yield srv
    assert srv.terminate() == 0, "\n".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=1)


@pytest.fixture()
def api(server):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)
    client.set_auth(USER, PASSWORD)
    return client


def test_webuiapi_txt2img_equals_python_api(api, pipe):
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=7, width=64, height=72, cfg_scale=6.5)
    expected = pipe.txt2img(PROMPT, negative_prompt="blurry", steps=3, guidance=6.5, seed=7, width=64, height=72,
                            scheduler="Euler a")
    assert len(result.images) == 1
    np.testing.assert_array_equal(pixels(result.images[0]), expected.images[0])
    info = result.info
    assert info["seed"] == 7 and info["all_seeds"] == [7] and info["width"] == 64 and info["height"] == 72
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["cfg_scale"] == 6.5
    assert info["infotexts"][0].startswith(f"{PROMPT}\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
    assert result.images[0].info["parameters"] == info["infotexts"][0]  # the PNG carries A1111's chunk
    assert result.parameters["prompt"] == PROMPT and result.parameters["seed"] == 7  # the request echoed


def test_webuiapi_batch_seeds_are_seed_plus_k(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=100, batch_size=2, n_iter=1, width=64, height=64)
    assert result.info["all_seeds"] == [100, 101]
    batch = pipe.txt2img(PROMPT, steps=3, guidance=7.0, seed=[100, 101], batch=2, width=64, height=64,
                         scheduler="Euler a")
    for k in range(2):
        np.testing.assert_array_equal(pixels(result.images[k]), batch.images[k])
    alone = pipe.txt2img(PROMPT, steps=3, guidance=7.0, seed=101, width=64, height=64, scheduler="Euler a")
    assert np.abs(pixels(result.images[1]).astype(int) - alone.images[0]).max() <= 1  # reproducible alone
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_webuiapi_sampler_and_scheduler_names(api, pipe):
    modern = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras")
    legacy = api.txt2img(prompt=PROMPT, seed=3, width=64, height=64, sampler_name="DPM++ 2M Karras",
                         scheduler="automatic")
    expected = pipe.txt2img(PROMPT, steps=3, guidance=7.0, seed=3, width=64, height=64, scheduler="DPM++ 2M Karras")
    np.testing.assert_array_equal(pixels(modern.images[0]), expected.images[0])
    np.testing.assert_array_equal(pixels(legacy.images[0]), expected.images[0])
    assert "Schedule type: Karras" in modern.info["infotexts"][0]
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert set(samplers["Euler a"]) == {"name", "aliases", "options"}
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    assert api.util_get_current_model() == api.get_sd_models()[0]["title"]


def _scene(size=128):
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_webuiapi_inpaint_only_masked_crops_and_pastes(api, pipe):
    image, mask = _scene(), Image.new("L", (128, 128), 0)
    mask.paste(255, (40, 48, 72, 80))
    result = api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=21, width=64, height=64,
                         denoising_strength=0.8, mask_blur=0, inpainting_fill=1, inpaint_full_res=True,
                         inpaint_full_res_padding=8)
    out = pixels(result.images[0])
    assert out.shape == (128, 128, 3)  # "only masked" answers at the input's size
    # independent of the server: crop (40-8, 48-8, 72+8, 80+8) is square like 64x64, so no widening
    box = (32, 40, 80, 88)
    crop = image.crop(box).resize((64, 64), Image.Resampling.LANCZOS)
    crop_mask = mask.crop(box).resize((64, 64), Image.Resampling.LANCZOS)
    gen = pipe.inpaint(crop, crop_mask, PROMPT, strength=0.8, steps=3, guidance=7.0, seed=21, width=64, height=64,
                       scheduler="Euler a").pil()[0].resize((48, 48), Image.Resampling.LANCZOS)
    expected = np.asarray(image).copy()
    inside = np.asarray(mask) == 255
    pasted = expected.copy()
    pasted[40:88, 32:80] = np.asarray(gen)
    expected[inside] = pasted[inside]
    np.testing.assert_array_equal(out, expected)
    assert "Inpaint area: Only masked" in result.info["infotexts"][0]


def test_webuiapi_inpaint_whole_picture_defaults(api, pipe):
    image = _scene(64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 40))
    plain = api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=5, width=64, height=64,
                        denoising_strength=0.75, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    gen = pipe.inpaint(image, mask, PROMPT, strength=0.75, steps=3, guidance=7.0, seed=5, width=64, height=64,
                       scheduler="Euler a").images[0]
    inside = np.asarray(mask)[..., None] == 255
    np.testing.assert_array_equal(pixels(plain.images[0]), np.where(inside, gen, np.asarray(image)))
    # webuiapi's defaults (blur 4, fill, only masked): outside the blurred mask the input's own pixels
    default = pixels(api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=5, width=64, height=64)
                     .images[0])
    from sdrt.serve.inpaint import gaussian_blur

    untouched = np.asarray(gaussian_blur(mask, 4, 4)) == 0
    assert untouched.sum() > 1000
    np.testing.assert_array_equal(default[untouched], np.asarray(image)[untouched])
    assert not np.array_equal(default, np.asarray(image))
    inverted = pixels(api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=5, width=64, height=64,
                                  mask_blur=0, inpainting_mask_invert=1, inpaint_full_res=False).images[0])
    np.testing.assert_array_equal(inverted[inside[..., 0]], np.asarray(image)[inside[..., 0]])
    as_bool = api.img2img(images=[image], mask_image=mask, prompt=PROMPT, seed=5, width=64, height=64,
                          mask_blur=0, inpainting_mask_invert=True, inpaint_full_res=False)  # A1111 coerces bools
    np.testing.assert_array_equal(pixels(as_bool.images[0]), inverted)


def test_webuiapi_progress_and_interrupt(api, server):
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", api.txt2img(prompt=PROMPT, seed=1, steps=60,
                                                                             width=64, height=64)))
    worker.start()
    progress = wait_until(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p, 120,
                          what="progress")
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 60
    assert progress["state"]["job_count"] >= 1 and progress["current_image"] is None
    assert api.interrupt() == {}
    worker.join(120)
    assert not worker.is_alive()
    result = out["r"]  # A1111: an interrupted job answers 200 with the image denoised so far
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    idle = api.get_progress()
    assert idle["state"]["job_count"] == 0 and idle["progress"] == 0


def test_webuiapi_without_auth_is_refused(server):
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    with pytest.raises(RuntimeError) as err:
        anonymous.txt2img(prompt=PROMPT, width=64, height=64, steps=1)
    assert err.value.args[0] == 401
    response = httpx.get(f"{server.url}/sdapi/v1/samplers", auth=(USER, "wrong"))
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    assert set(response.json()) == {"error", "detail"}
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # the one open route


def test_openai_images_generate(server, pipe):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
    response = client.images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
                                      extra_body={"steps": 3, "seed": 11})
    expected = pipe.txt2img(PROMPT, steps=3, guidance=7.5, seed=[11, 12], batch=2, width=64, height=64)
    assert len(response.data) == 2
    for k, item in enumerate(response.data):
        np.testing.assert_array_equal(pixels(item.b64_json), expected.images[k])
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt=PROMPT, size="64x64")
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt=PROMPT, size="64x64", style="vivid")
    assert err.value.response.json()["detail"].startswith("style:")
