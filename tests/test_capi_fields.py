"""libsdrt's fields and rules added after the first layouts (capi/sdrt.h): ``rng`` (pixels equal to
``Pipeline(rng=...)``'s), the published struct layouts (an older struct's caller keeps working), and calls on
a closed context (refused, never a crash). Driven from C by tests/capi/capi_test.c, as tests/test_capi.py."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.pipeline import Pipeline
from tests.test_capi import ERR_INPUT, FAST, OK, build_capi, cmd, ppm, run

PROMPT = "a photo of a cat"


@pytest.fixture(scope="session")
def capi(tmp_path_factory):
    return build_capi(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=1)


def test_rng_pixels_equal_python_api(capi, tiny_engine_dir, pipe, tmp_path):
    """rng "cuda" / "cuda:t4" give Pipeline(rng=...)'s pixels (Euler a: every step draws from the generator);
    NULL is the CPU generator, and a caller of the previous layout (struct_size V2, rng beyond it) gets it too."""
    o, common = tmp_path, {"steps": 3, "scheduler": "Euler a", "width": 64, "height": 64}
    results, logs, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=1),
        cmd("gen", 0, seed=4, rng="cuda", out=o / "c", **common),
        cmd("gen", 0, seed=4, rng="CUDA:T4", batch=2, out=o / "t", **common),
        cmd("gen", 0, seed=4, out=o / "n", **common),
        cmd("gen", 0, seed=4, struct_size="v2", out=o / "v", **common),
        cmd("close", 0)])
    assert stderr == "" and logs == []
    assert [r["status"] for r in results] == [OK] * 6, results
    expected = {"c": pipe.txt2img(PROMPT, seed=4, rng="cuda", **common).images,
                "t": pipe.txt2img(PROMPT, seed=4, batch=2, rng="cuda:t4", **common).images,
                "n": pipe.txt2img(PROMPT, seed=4, **common).images}
    expected["v"] = expected["n"]
    for prefix, images in expected.items():
        assert results[1 + "ctnv".index(prefix)]["count"] == len(images)
        for k, image in enumerate(images):
            assert np.array_equal(ppm(o / f"{prefix}-{k}.ppm"), image), prefix
    assert not np.array_equal(expected["c"][0], expected["n"][0])


BAD = [  # (gen options, needles)
    ({"rng": "tpu"}, ["rng: must be cpu, cuda or cuda:GPU", "'tpu'"]),
    ({"rng": "cuda:voodoo5"}, ["rng: unknown GPU 'voodoo5'", "h100"]),
    ({"rng": "cuda:sm=0"}, ["rng: sm must be in"]),
    ({"rng": "cuda:sm=x"}, ["rng: cuda:sm=N[,threads=M] takes integers"]),
    ({"struct_size": "v2+4"}, ["struct_size is", "not a published layout"]),  # half of the rng pointer
]


def test_bad_rng_and_layouts_are_input_errors(capi, tiny_engine_dir, tmp_path):
    lines = [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1)]
    lines += [cmd("gen", 0, **FAST, **options) for options, _ in BAD] + [cmd("gen", 0, **FAST)]
    results, _, stderr = run(capi, tmp_path, lines)
    assert stderr == ""
    for (options, needles), got in zip(BAD, results[1:], strict=False):
        assert got["status"] == ERR_INPUT and got["images_null"] == 1 and got["count"] == 0, (options, got)
        assert "\n" not in got["error"] and got["ctx_error"] == got["error"]
        for needle in needles:
            assert needle in got["error"], (options, needle, got["error"])
    assert results[-1]["status"] == OK  # the context still works


def test_calls_on_a_closed_context_are_refused(capi, tiny_engine_dir, tmp_path):
    """sdrt_cancel, sdrt_last_error, sdrt_generate and a second sdrt_context_close on a closed context: a
    status and a message, no crash (the process would die otherwise: run() asserts exit 0); a context opened
    after it works, with its own address."""
    results, _, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=1), cmd("gen", 0, **FAST), cmd("close", 0),
        cmd("stale", 0), cmd("open", 0, engine_dir=tiny_engine_dir, threads=1), cmd("gen", 0, **FAST),
        cmd("stale", 0), cmd("close", 0)])
    assert stderr == ""
    stale = results[3]
    assert stale["status"] == ERR_INPUT and "sdrt_generate: ctx is closed" in stale["error"], stale
    assert "closed" in stale["before"] and "closed" in stale["ctx_error"]
    assert stale["images_null"] == 1 and stale["count"] == 0
    assert [r["status"] for r in results[4:6]] == [OK, OK]
    assert results[6]["status"] == ERR_INPUT and "closed" in results[6]["error"]  # the old handle, still refused


def test_controlnet_lora_and_layout_v3(capi, tiny_engine_dir, tiny_model_dir, pipe, tmp_path, tmp_path_factory):
    """control_images (any size) / control_scales / start / end / guess_mode and lora_paths / lora_weights give
    Pipeline's pixels; a caller of layout V3 (struct_size before them, garbage beyond) gets the plain image."""
    from PIL import Image

    from sdrt_export.lora_random import write_random_lora
    from tests.serve_fixtures import control_picture, controlnet_artifact

    cn_dir = controlnet_artifact(tiny_model_dir, tmp_path_factory)
    lora = str(write_random_lora(tiny_model_dir, tmp_path / "k.safetensors", "kohya", ("unet", "text_encoder"),
                                 rank=4, alpha=2.0, seed=1))
    picture = control_picture(80, 48, 2)
    picture.save(tmp_path / "control.ppm")
    o, common = tmp_path, {"steps": 3, "scheduler": "Euler a", "width": 64, "height": 64, "seed": 3}
    control = {"control_scales": 0.7, "control_start": 0.0, "control_end": 0.75, "guess_mode": 1}
    results, logs, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=cn_dir, threads=1), cmd("open", 1, engine_dir=tiny_engine_dir, threads=1),
        cmd("gen", 0, control=o / "control.ppm", out=o / "c", **control, **common),
        cmd("gen", 0, out=o / "n", **common),
        cmd("gen", 1, lora=f"{lora}:0.8", out=o / "l", **common),
        cmd("gen", 1, lora=lora, out=o / "w", **common),
        cmd("gen", 1, struct_size="v3", out=o / "v", **common)])
    assert stderr == "" and logs == []
    assert [r["status"] for r in results] == [OK] * 7, results
    cn_pipe = Pipeline(cn_dir, threads=1)
    control["guess_mode"] = True
    expected = {"c": cn_pipe.txt2img(PROMPT, control_images=[picture], **control, **common).images,
                "n": cn_pipe.txt2img(PROMPT, **common).images,
                "l": pipe.txt2img(PROMPT, loras=[(lora, 0.8)], **common).images,
                "w": pipe.txt2img(PROMPT, loras=[(lora, 1.0)], **common).images,
                "v": pipe.txt2img(PROMPT, **common).images}
    for prefix, images in expected.items():
        assert np.array_equal(ppm(o / f"{prefix}-0.ppm"), images[0]), prefix
    assert not np.array_equal(expected["c"][0], expected["n"][0])
    assert not np.array_equal(expected["l"][0], expected["v"][0]) and not np.array_equal(expected["l"][0],
                                                                                         expected["w"][0])
    assert Image.open(o / "c-0.ppm").size == (64, 64)


def test_kandinsky_txt2img(capi, tmp_path, tmp_path_factory):
    from tests.serve_fixtures import kandinsky_artifact

    k22 = kandinsky_artifact(tmp_path_factory)
    kw = {"steps": 2, "guidance": 3.0, "width": 64, "height": 64, "seed": 8}
    results, _, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=k22, threads=1),
        cmd("gen", 0, prior_steps=3, prior_guidance=5.0, negative="blurry", batch=2, out=tmp_path / "k", **kw),
        cmd("gen", 0, lora="x.safetensors", **kw)])
    assert stderr == ""
    assert results[1]["status"] == OK and results[1]["steps"] == results[1]["total"] == 5, results[1]  # 3 + 2
    want = Pipeline(k22, threads=1).txt2img(PROMPT, negative_prompt="blurry", batch=2, prior_steps=3,
                                            prior_guidance=5.0, **kw).images
    for k in range(2):
        assert np.array_equal(ppm(tmp_path / f"k-{k}.ppm"), want[k])
    assert results[2]["status"] == ERR_INPUT and "not supported for Kandinsky" in results[2]["error"]


V3_BAD = [  # (gen options, needles) on the plain tiny artifact
    ({"control_count": 1}, ["control_count is 1 but control_images is NULL"]),
    ({"control_count": 999}, ["control_count is 999", "0..64"]),
    ({"control": "IMG"}, ["has no ControlNet"]),
    ({"guess_mode": 1}, ["guess_mode given without a control image"]),
    ({"lora_count": 2}, ["lora_count is 2 but lora_paths is NULL"]),
    ({"lora": "/no/such.safetensors"}, ["/no/such.safetensors"]),
    ({"prior_steps": 5}, ["prior_steps: only Kandinsky 2.2 artifacts have a prior"]),
    ({"prior_guidance": 2}, ["prior_guidance: only Kandinsky"]),
]


def test_bad_v3_fields_are_input_errors(capi, tiny_engine_dir, tmp_path):
    from tests.serve_fixtures import control_picture

    control_picture(64, 64, 1).save(tmp_path / "c.ppm")
    lines = [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1)]
    lines += [cmd("gen", 0, **FAST, **{k: (tmp_path / "c.ppm" if v == "IMG" else v) for k, v in options.items()})
              for options, _ in V3_BAD]
    results, _, stderr = run(capi, tmp_path, lines)
    assert stderr == ""
    for (options, needles), got in zip(V3_BAD, results[1:], strict=True):
        assert got["status"] == ERR_INPUT and got["images_null"] == 1, (options, got)
        for needle in needles:
            assert needle in got["error"], (options, needle, got["error"])


def test_threads_beyond_the_machine_is_an_input_error(capi, tiny_engine_dir, tmp_path):
    import os

    results, _, stderr = run(capi, tmp_path, [cmd("open", 0, engine_dir=tiny_engine_dir, threads=100000),
                                              cmd("open", 1, engine_dir=tiny_engine_dir, threads=1)])
    assert stderr == ""
    assert results[0]["status"] == ERR_INPUT and results[0]["opened"] == 0
    assert f"threads must be an integer in 1..{os.cpu_count()}" in results[0]["error"], results[0]
    assert results[1]["status"] == OK
