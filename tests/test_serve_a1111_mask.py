"""A1111's img2img with a blank mask and "only masked" (inpaint_full_res): A1111 logs that it cannot crop and
runs img2img of the whole image (no mask, no overlay); sdrt serve does the same, with the Python API's pixels."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve_fixtures import PROMPT, ThreadServer, b64_png, control_picture, pixels

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(tiny_engine_dir):
    from sdrt.serve.executor import LocalExecutor

    executor = LocalExecutor(str(tiny_engine_dir), threads=1)
    executor.warm_up()
    srv = ThreadServer(executor)
    yield srv
    srv.close()


@pytest.mark.parametrize("invert", [False, True])
def test_blank_mask_only_masked_is_img2img_of_the_whole_image(server, invert):
    image = control_picture(96, 80, 4)
    mask = Image.new("L", image.size, 255 if invert else 0)  # blank once inverted, too
    body = {"prompt": PROMPT, "init_images": [b64_png(image)], "mask": b64_png(mask), "seed": 12, "steps": 3,
            "width": 64, "height": 64, "cfg_scale": 7.5, "denoising_strength": 0.6, "sampler_name": "Euler a",
            "inpaint_full_res": True, "inpaint_full_res_padding": 32, "inpainting_mask_invert": int(invert)}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    got = pixels(response.json()["images"][0])
    resized = image.resize((64, 64), Image.Resampling.LANCZOS)
    want = server.executor.pipe.img2img(resized, PROMPT, strength=0.6, steps=3, seed=12, scheduler="Euler a",
                                        width=64, height=64).images[0]
    np.testing.assert_array_equal(got, want)
    assert "Inpaint area" not in response.json()["info"]
    assert not np.array_equal(got, np.asarray(resized))  # generated, not the input pasted back
