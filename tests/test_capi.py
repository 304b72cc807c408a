"""libsdrt, the C ABI (capi/sdrt.h): built with cffi's embedding mode, driven from C by tests/capi/capi_test.c
(compiled here with ``cc``) in a process with an empty environment, checked against the Python API.

The C program runs a script (one libsdrt call a line) and prints one JSON object a line; see its header.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
OK, ERR_INPUT, ERR_ARTIFACT, ERR_CANCELLED, ERR_INTERNAL, ERR_IO = 0, 2, 3, 4, 5, 6
FAST = {"steps": 2, "width": 64, "height": 64, "seed": 0}


@pytest.fixture(scope="session")
def capi(tmp_path_factory):
    return build_capi(tmp_path_factory)


def build_capi(tmp_path_factory) -> Path:
    """libsdrt built by capi/build.py (what `make capi` runs) and the test program linked against it; built
    once per session, whichever test module asks first (tests/test_capi_fields.py too)."""
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.fail("libsdrt's tests need a C compiler (cc)")
    out = tmp_path_factory.getbasetemp() / "capi-build"
    if (out / "capi_test").exists():
        return out
    out.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "capi" / "build.py"), str(out)], check=True, capture_output=True)
    program = out / "capi_test"
    subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'capi'}",
                    str(ROOT / "tests" / "capi" / "capi_test.c"), "-o", str(program), f"-L{out}",
                    f"-Wl,-rpath,{out}", "-lsdrt", "-lpthread"], check=True)
    return out


@pytest.fixture(scope="module")
def pipe(tiny_engine_dir):
    return Pipeline(tiny_engine_dir, threads=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 64x64 RGB image and mask as PPM/PGM (for the C program) and PIL images (for the Python API)."""
    root = tmp_path_factory.mktemp("capi-inputs")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    mask = Image.fromarray(mask)
    image.save(root / "in.ppm")
    mask.save(root / "mask.pgm")
    Image.fromarray(np.zeros((64, 72), np.uint8)).save(root / "mask-72x64.pgm")
    return {"dir": root, "image": image, "mask": mask}


def run(capi, tmp_path, lines: list[str], env: dict | None = None) -> tuple[list[dict], list[dict], str]:
    """Run the script in a process with only ``env`` (default: nothing); (results, log lines, stderr)."""
    script = tmp_path / "script.txt"
    script.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(capi / "capi_test"), str(script)], env=env or {}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0] == {"abi": 1, "header_abi": 1, "version": "0.1.0"}
    return [r for r in rows[1:] if "what" in r], [r for r in rows if "log" in r], proc.stderr


def cmd(*fields, **options) -> str:
    return "\t".join([*map(str, fields), *(f"{k}={v}" for k, v in options.items())])


def ppm(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_pixels_equal_python_api(capi, tiny_engine_dir, pipe, inputs, tmp_path):
    """txt2img, img2img, inpaint (and batch 2, default size, random seed, a non-float32 guidance) through C
    give the Python API's pixels; the process has an empty environment and prints nothing to stderr."""
    d, o = inputs["dir"], tmp_path
    common = {"steps": 3, "scheduler": "Euler a"}
    results, logs, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=1),
        cmd("gen", 0, seed=42, width=64, height=96, out=o / "t", **common),
        cmd("gen", 0, mode="img2img", image=d / "in.ppm", strength=0.6, seed=1, out=o / "i", **common),
        cmd("gen", 0, mode="inpaint", image=d / "in.ppm", mask=d / "mask.pgm", seed=2, out=o / "p", **common),
        cmd("gen", 0, seed=3, batch=2, guidance=7.3, negative="blurry", steps=2, out=o / "b"),
        cmd("gen", 0, seed=-1, width=64, height=64, steps=2, out=o / "r"),
        cmd("close", 0)])
    assert stderr == "" and logs == []
    assert [r["status"] for r in results] == [OK] * 7, results
    assert all(r["error"] == "" and r.get("ctx_error", "") == "" for r in results)
    t, i, p, b, r = results[1:6]
    assert t["size"] == [64, 96, 3] and t["seed"] == 42 and t["steps"] == t["total"] == 3
    assert b["count"] == 2 and b["size"] == [128, 128, 3]  # width/height 0: the artifact's opt size
    assert 0 <= r["seed"] < 2**32
    expected = {
        "t": pipe.txt2img("a photo of a cat", seed=42, width=64, height=96, **common).images,
        "i": pipe.img2img(inputs["image"], "a photo of a cat", strength=0.6, seed=1, **common).images,
        "p": pipe.inpaint(inputs["image"], inputs["mask"], "a photo of a cat", seed=2, **common).images,
        "b": pipe.txt2img("a photo of a cat", seed=3, batch=2, guidance=7.3, negative_prompt="blurry",
                          steps=2).images,
        "r": pipe.txt2img("a photo of a cat", seed=r["seed"], width=64, height=64, steps=2).images}
    for prefix, images in expected.items():
        for k, image in enumerate(images):
            assert np.array_equal(ppm(o / f"{prefix}-{k}.ppm"), image), prefix
    assert not np.array_equal(expected["b"][0], expected["b"][1])


def test_cancel_from_callback_and_from_another_thread_and_reentry(capi, tiny_engine_dir, tmp_path):
    results, _, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=1),
        cmd("gen", 0, cancel_at=2, scheduler="Euler", **{**FAST, "steps": 5}),
        cmd("gen", 0, thread_cancel_at=3, scheduler="Euler", **{**FAST, "steps": 5}),
        cmd("gen", 0, scheduler="Euler", **FAST),  # a cancel does not stick to later calls
        cmd("gen", 0, scheduler="Euler", reenter_at=1, **FAST),
        cmd("cancel", 0), cmd("gen", 0, scheduler="Euler", **FAST)])  # a cancel before a generate: not reached
    assert stderr == ""
    callback, thread, after, reentered, _, precancelled = results[1:]
    assert precancelled["status"] == OK and precancelled["steps"] == 2, precancelled
    assert reentered["status"] == OK and reentered["reenter_status"] == ERR_INPUT, reentered  # and no deadlock
    assert callback["status"] == ERR_CANCELLED and callback["steps"] == 2 and "step 2/5" in callback["error"]
    assert thread["status"] == ERR_CANCELLED and thread["steps"] == 3, thread
    assert "sdrt_cancel" in thread["error"] and "step 3/5" in thread["error"]
    assert callback["images_null"] and callback["count"] == 0
    assert after["status"] == OK and after["steps"] == 2


def test_close_from_another_thread_during_generate(capi, tiny_engine_dir, tmp_path):
    """sdrt_context_close while a generate runs: it cancels that generate, waits for it, then frees; no crash,
    no deadlock, and a new context works after it. (Whether the generate had finished first is timing.)"""
    results, _, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=1),
        cmd("gen", 0, close_at=1, scheduler="Euler", **{**FAST, "steps": 30}),
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=1),
        cmd("gen", 0, **FAST), cmd("close", 0)])
    assert stderr == ""
    closed = results[1]
    assert closed["status"] in (OK, ERR_CANCELLED), closed
    if closed["status"] == ERR_CANCELLED:
        assert closed["steps"] < 30 and closed["images_null"] == 1
    assert [r["status"] for r in results[2:]] == [OK, OK, OK]


BAD_REQUESTS = [  # (gen options, status, needles): the CLI's refusals (tests/test_cli_errors.py) and C's own
    ({"width": 100}, ERR_INPUT, ["width 100", "multiple of 8"]),
    ({"height": 60}, ERR_INPUT, ["height 60", "multiple of 8"]),
    ({"width": 512}, ERR_INPUT, ["width 512", "64..256"]),
    ({"height": 32}, ERR_INPUT, ["height 32", "64..256"]),
    ({"width": -64}, ERR_INPUT, ["width -64", "64..256"]),
    ({"steps": 0}, ERR_INPUT, ["steps", "0"]),
    ({"steps": -3}, ERR_INPUT, ["steps", "-3"]),
    ({"guidance": "nan"}, ERR_INPUT, ["guidance", "nan"]),
    ({"guidance": "inf"}, ERR_INPUT, ["guidance", "inf"]),
    ({"guidance": -1}, ERR_INPUT, ["guidance", "-1"]),
    ({"batch": 0}, ERR_INPUT, ["batch", "0"]),
    ({"batch": 3}, ERR_INPUT, ["batch 3", "1..2"]),
    ({"scheduler": "Eulr b"}, ERR_INPUT, ["Eulr b", "Euler a", "DPM++ 2M Karras", "DDIM"]),
    ({"mode": "img2img", "strength": 0}, ERR_INPUT, ["strength", "(0, 1]"]),
    ({"mode": "img2img", "strength": 1.5}, ERR_INPUT, ["strength", "(0, 1]"]),
    ({"mode": "inpaint", "strength": -0.1}, ERR_INPUT, ["strength", "(0, 1]"]),
    ({"mode": "inpaint", "strength": "nan"}, ERR_INPUT, ["strength", "(0, 1]"]),
    ({"mode": "img2img", "strength": 0.01, "scheduler": "Euler"}, ERR_INPUT, ["strength 0.01", "no denoising"]),
    ({"mode": "inpaint", "mask": "mask-72x64.pgm"}, ERR_INPUT, ["mask size 72x64", "image size 64x64"]),
    ({"mode": "img2img", "image": None}, ERR_INPUT, ["img2img needs init_image"]),
    ({"mode": "inpaint", "mask": None}, ERR_INPUT, ["inpaint needs mask_image"]),
    ({"image": "in.ppm"}, ERR_INPUT, ["init_image is not used by txt2img"]),
    ({"mode": "img2img", "image": None, "bad_image": "data"}, ERR_INPUT, ["init_image has no pixels"]),
    ({"mode": "img2img", "image": None, "bad_image": "channels"}, ERR_INPUT, ["channels is 2"]),
    ({"mode": "upscale"}, ERR_INPUT, ["unknown mode 'upscale'", "txt2img"]),
    ({"prompt": "NULL"}, ERR_INPUT, ["prompt is NULL"]),
    ({"struct_size": 0}, ERR_INPUT, ["struct_size is 0", "sdrt_generate_params_init"]),
    ({"struct_size": "v1-1"}, ERR_INPUT, ["struct_size", "must be between"]),
    ({"struct_size": "v1+4"}, ERR_INPUT, ["struct_size is", "not a published layout"]),  # half a pointer
    ({"struct_size": 3435973836}, ERR_INPUT, ["struct_size is 3435973836"]),
    ({"struct_size": "bigx"}, ERR_INPUT, ["newer libsdrt"]),
    ({"null": "params"}, ERR_INPUT, ["params is NULL"]),
    ({"null": "images_out"}, ERR_INPUT, ["images_out and count_out"]),
    ({"null": "count_out"}, ERR_INPUT, ["images_out and count_out"]),
    ({"null": "ctx"}, ERR_INPUT, ["ctx is NULL"]),
]


def _request(options: dict, folder: Path) -> dict:
    """FAST plus the inputs the mode needs (in.ppm, mask.pgm), then ``options``; None drops an input."""
    mode = options.get("mode", "txt2img")
    request = {**FAST, **({"image": "in.ppm"} if mode != "txt2img" else {}),
               **({"mask": "mask.pgm"} if mode == "inpaint" else {}), **options}
    for key in ("image", "mask"):
        if request.get(key, None) is None:
            request.pop(key, None)
        else:
            request[key] = folder / request[key]
    return request


def test_every_bad_request_is_a_status_and_one_line(capi, tiny_engine_dir, inputs, tmp_path):
    lines = [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1)]
    lines += [cmd("gen", 0, **_request(options, inputs["dir"])) for options, _, _ in BAD_REQUESTS]
    lines += [cmd("gen", 0, seed=7, **{k: v for k, v in FAST.items() if k != "seed"}), cmd("close", 0)]
    results, _, stderr = run(capi, tmp_path, lines)
    assert stderr == ""
    for (options, status, needles), got in zip(BAD_REQUESTS, results[1:]):
        assert got["status"] == status, (options, got)
        assert "\n" not in got["error"] and got["error"] == got["thread_error"], got
        if options.get("null") != "ctx":
            assert got["ctx_error"] == got["error"]
        for needle in needles:
            assert needle in got["error"], (options, needle, got["error"])
        if options.get("null") not in ("images_out", "count_out"):
            assert got["images_null"] == 1 and got["count"] == 0 and got["seed"] == -2, got
    assert results[-2]["status"] == OK and results[-2]["error"] == ""  # the context still works


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def test_bad_artifact_open_and_save_errors(capi, tiny_engine_dir, inputs, tmp_path):
    tampered = Path(shutil.copytree(tiny_engine_dir, tmp_path / "tampered"))
    _flip_bytes(tampered / "unet.onnx")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["engines"].pop("ort-cpu-native")  # so the exported unet.onnx is the graph opened (not its native copy)
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    broken = Path(shutil.copytree(tiny_engine_dir, tmp_path / "broken"))
    (broken / "manifest.json").write_text("not json")
    image = inputs["dir"] / "in.ppm"
    (tmp_path / "file").write_text("a file, not a folder")
    results, _, stderr = run(capi, tmp_path, [
        cmd("open", 0, engine_dir=tmp_path / "no-such-engine"),
        cmd("open", 0, engine_dir=broken),
        cmd("open", 0, engine_dir=tiny_engine_dir, backend="ort-tpu"),
        cmd("open", 0, engine_dir=tiny_engine_dir, threads=-1),
        cmd("open", 0, engine_dir=tiny_engine_dir, struct_size="v1-1"),
        cmd("open", 0, engine_dir=tiny_engine_dir, struct_size="bigx"),
        cmd("open", 1, engine_dir=tampered),
        cmd("gen", 1, **FAST),
        cmd("close", 1),
        "nulls",
        cmd("save", image="NULL", path=tmp_path / "x.png"),
        cmd("save", image=image, path="NULL"),
        cmd("save", image=image, path=tmp_path / "x.jpg"),
        cmd("save", image=image, path=tmp_path / "file" / "x.png"),
        cmd("save", image=image, path=tmp_path / "x.png", parameters="a cat\\nSteps: 2, Seed: 0"),
        cmd("save", image=image, path=tmp_path / "x.png", parameters="second write replaces")])
    assert stderr == ""
    expect = [(ERR_ARTIFACT, "does not exist"), (ERR_ARTIFACT, "not valid JSON"), (ERR_INPUT, "unknown backend"),
              (ERR_INPUT, "threads"), (ERR_INPUT, "struct_size"), (ERR_INPUT, "newer libsdrt"), (OK, ""),
              (ERR_ARTIFACT, "sha256"), (OK, ""),
              (ERR_INPUT, "params is NULL"), (ERR_INPUT, "out is NULL"), (ERR_INPUT, "engine_dir is NULL"),
              (ERR_INPUT, "struct_size is 0"), (ERR_INPUT, "struct_size is 3435973836"), (ERR_INPUT, "no pixels"),
              (OK, ""),
              (ERR_INPUT, "image is NULL"), (ERR_INPUT, "path is NULL"), (ERR_INPUT, ".png"), (ERR_IO, "cannot write"),
              (OK, ""), (OK, "")]
    assert [(r["status"], n in r["error"]) for r, (_, n) in zip(results, expect)] == [(s, True) for s, _ in expect]
    assert all(r["opened"] == (r["status"] == OK) for r in results if r["what"] == "open")
    assert results[9]["ctx"] is None  # *out is NULL after a failed open
    saved = Image.open(tmp_path / "x.png")
    assert saved.info["parameters"] == "second write replaces"
    assert np.array_equal(np.asarray(saved), np.asarray(inputs["image"]))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".x")) == []  # no temp file left


def test_two_contexts_at_once_and_one_context_from_two_threads(capi, tiny_engine_dir, pipe, tmp_path):
    o = tmp_path
    results, _, stderr = run(capi, tmp_path, [
        cmd("parallel_open", 0, 1, engine_dir=tiny_engine_dir, threads=1),  # the first calls: both start Python
        cmd("parallel", 0, 1, seedA=1, seedB=2, outA=o / "a", outB=o / "b", steps=4, width=64, height=64),
        cmd("parallel", 0, 0, seedA=3, seedB=4, outA=o / "c", outB=o / "d", steps=4, width=64, height=64)])
    assert stderr == ""
    assert [(r["what"], r["status"], r["opened"]) for r in results[:2]] == [("open", OK, 1)] * 2
    for row in results[2:]:
        assert row["status"] == OK and row["steps"] == row["total"], row  # each context's own progress
    for name, seed in zip("abcd", (1, 2, 3, 4)):
        expected = pipe.txt2img("a photo of a cat", seed=seed, steps=4, width=64, height=64).images[0]
        assert np.array_equal(ppm(o / f"{name}-0.ppm"), expected), name


def test_log_callback_per_context_and_stderr_only_when_asked(capi, tiny_engine_dir, tmp_path):
    """An unwritable SDRT_ORT_CACHE makes each engine open log a warning: it reaches the log callback of
    the context that opened the engine, stderr only without a callback and with SDRT_LOG_STDERR=1. A
    context opened with the first published struct_size gets the default log_level (WARNING)."""
    env = {"SDRT_ORT_CACHE": "/proc/sdrt-no-cache"}
    script = [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1, log=1, struct_size="v1"),
              cmd("open", 1, engine_dir=tiny_engine_dir, threads=1, log=1, struct_size="big0"),
              cmd("gen", 1, **FAST), cmd("gen", 0, **FAST)]
    results, logs, stderr = run(capi, tmp_path, script, env)
    assert [r["status"] for r in results] == [OK] * 4 and stderr == ""
    assert logs and all(r["level"] == 30 and "cannot write ORT cache" in r["message"] for r in logs), logs
    slots = [r["log"] for r in logs]
    assert slots == sorted(slots, reverse=True) and set(slots) == {0, 1}  # slot 1 generated first
    quiet = [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1), cmd("gen", 0, **FAST)]
    assert run(capi, tmp_path, quiet, env)[2] == ""
    loud = run(capi, tmp_path, quiet, {**env, "SDRT_LOG_STDERR": "1"})[2]
    assert "cannot write ORT cache" in loud


def test_plugin_host_dlopen_rtld_local(capi, tiny_engine_dir, tmp_path):
    """Loaded with dlopen(RTLD_LOCAL), libsdrt still imports numpy/onnxruntime (it makes libpython global)."""
    program = tmp_path / "dlopen_test"
    subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", f"-I{ROOT / 'capi'}", str(ROOT / "tests" / "capi" /
                    "dlopen_test.c"), "-o", str(program), "-ldl"], check=True)
    proc = subprocess.run([str(program), str(capi / "libsdrt.so"), str(tiny_engine_dir)], env={},
                          capture_output=True, text=True, timeout=600)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "0 \n", "")


def test_python_home_override(capi, tiny_engine_dir, tmp_path):
    venv = sys.prefix
    script = [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1), cmd("gen", 0, **FAST)]
    results, _, stderr = run(capi, tmp_path, script, {"SDRT_PYTHONHOME": venv})
    assert [r["status"] for r in results] == [OK, OK] and stderr == ""
    results, _, stderr = run(capi, tmp_path, script, {"SDRT_PYTHONHOME": str(tmp_path / "no-python")})
    assert [r["status"] for r in results] == [ERR_INTERNAL, ERR_INPUT] and stderr == ""
    assert "no Python" in results[0]["error"] and "SDRT_PYTHONHOME" in results[0]["error"]
    if sys.prefix != sys.base_prefix:  # a Python without sdrt installed: starts, then reports, prints nothing
        results, _, stderr = run(capi, tmp_path, script, {"SDRT_PYTHONHOME": sys.base_prefix})
        assert results[0]["status"] == ERR_INTERNAL and "failed to start" in results[0]["error"], results
        assert stderr == ""


@pytest.mark.slow
def test_200_generate_free_cycles_keep_rss_flat(capi, tiny_engine_dir, tmp_path):
    results, _, stderr = run(capi, tmp_path, [cmd("open", 0, engine_dir=tiny_engine_dir, threads=1),
                                              cmd("cycles", 0, n=200, steps=1, width=64, height=64, seed=0)])
    cycles = results[1]
    assert cycles["status"] == OK and cycles["failures"] == 0, cycles
    growth_kib = cycles["rss_end_kib"] - cycles["rss_warm_kib"]
    # 180 cycles after warm-up: ~0.3 MiB measured here; one leaked 64x64 RGB image a cycle would add 2.1 MiB
    assert growth_kib < 1536, cycles


def test_example_and_pkg_config(capi, tiny_engine_dir, pipe, tmp_path):
    out = tmp_path / "cat.png"
    proc = subprocess.run([str(capi / "txt2img"), str(tiny_engine_dir), "a photo of a cat", str(out), "3", "5"],
                          env={}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\] (\d+)/\1\n$", proc.stderr) and f"saved {out} (seed 5)" in proc.stdout  # the bar's end
    image = Image.open(out)
    assert image.info["parameters"].startswith("a photo of a cat\nSteps: 3, ") and "Seed: 5" in image.info["parameters"]
    assert np.array_equal(np.asarray(image), pipe.txt2img("a photo of a cat", steps=3, seed=5).images[0])
    if shutil.which("pkg-config"):
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "sdrt"], env={"PKG_CONFIG_PATH": str(capi)},
                               capture_output=True, text=True, check=True).stdout.split()
    else:  # read sdrt.pc as pkg-config would
        pc = dict(line.split("=", 1) for line in (capi / "sdrt.pc").read_text().splitlines() if "=" in line
                  and ":" not in line.split("=", 1)[0])
        fields = dict(line.split(": ", 1) for line in (capi / "sdrt.pc").read_text().splitlines() if ": " in line)
        text = f"{fields['Cflags']} {fields['Libs']}".replace("${libdir}", pc["libdir"])
        flags = text.replace("${includedir}", pc["includedir"]).split()
    program = tmp_path / "abi"
    source = tmp_path / "abi.c"
    source.write_text('#include "sdrt.h"\nint main(void) { return sdrt_abi_version() == SDRT_ABI_VERSION ? 0 : 1; }\n')
    subprocess.run(["cc", "-std=c99", "-pedantic", "-Wall", "-Werror", str(source), "-o", str(program), *flags],
                   check=True)
    assert subprocess.run([str(program)], env={}).returncode == 0
    plain = tmp_path / "plain"  # the command line exactly: no rpath, no LD_LIBRARY_PATH at run time
    subprocess.run(["cc", str(source), f"-I{ROOT / 'capi'}", f"-L{capi}", "-lsdrt", "-o", str(plain)], check=True)
    assert subprocess.run([str(plain)], env={}).returncode == 0
    if shutil.which("c++"):  # the header's extern "C" guards
        subprocess.run(["c++", "-x", "c++", "-fsyntax-only", "-Wall", "-Werror", str(source), *flags], check=True)
