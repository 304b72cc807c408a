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
