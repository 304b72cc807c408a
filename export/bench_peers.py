"""stable-diffusion.cpp as a peer of ``sdrt bench --compare sdcpp``: a worker
(``python -m sdrt_export.bench_peers --worker``) driving the PyPI package ``stable-diffusion-cpp-python``
on the same diffusers folder, threads and request as the other systems.

stable-diffusion.cpp reads diffusers folders (``ModelLoader::init_from_diffusers_file``) but detects
the SD version from the text encoder's ``text_model.embeddings.token_embedding.weight``; transformers 5
saves ``CLIPTextModel`` without that ``text_model.`` prefix (released checkpoints have it), so the bench
hands it a *view* of the folder (``sdcpp_view``): symlinks to every file, the text encoder's safetensors
rewritten with the prefix. Stages come from its log lines (``get_learned_condition``, ``decode_first_stage``)
and per-step progress callbacks; it has no PNDM, so the model's default scheduler runs as ``euler``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path

TEXT_ENCODER_FILE = Path("text_encoder") / "model.safetensors"
PREFIX = "text_model."
# A1111 / diffusers names -> sd.cpp sample methods (per-step work is one CFG UNet evaluation in each)
SAMPLERS = {"euler": "euler", "eulerdiscretescheduler": "euler", "euler a": "euler_a",
            "eulerancestraldiscretescheduler": "euler_a", "heun": "heun", "heundiscretescheduler": "heun",
            "dpm++ 2m": "dpm++2m", "dpm++ 2m karras": "dpm++2m", "dpmsolvermultistepscheduler": "dpm++2m",
            "lcm": "lcm", "lcmscheduler": "lcm"}
# sd.cpp hard-codes the released architectures: the UNet widths and the CLIP width per SD version
SUPPORTED = {(320, 640, 1280, 1280): (768, 1024)}


def support(model_dir: str | os.PathLike) -> str | None:
    """Why stable-diffusion.cpp cannot run this diffusers folder, or None when it can."""
    root = Path(model_dir)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        text = json.loads((root / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return f"{root} has no readable unet/ and text_encoder/ configs"
    if (root / "text_encoder_2").is_dir():
        return "SDXL-shaped folder: not run by this bench (two 14 GB systems do not fit beside the others)"
    widths = tuple(unet.get("block_out_channels", ()))
    if widths not in SUPPORTED or text.get("hidden_size") not in SUPPORTED[widths]:
        return (f"stable-diffusion.cpp supports only the released SD architectures (UNet widths 320/640/1280/1280,"
                f" CLIP width 768 or 1024); this model has {list(widths)} / {text.get('hidden_size')}")
    return None


def sdcpp_view(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A folder stable-diffusion.cpp accepts: symlinks to ``model_dir``'s files, and a copy of the text
    encoder's safetensors whose keys carry the ``text_model.`` prefix (kept as they are when they do)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src, out = Path(model_dir).resolve(), Path(out_dir)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or rel == TEXT_ENCODER_FILE:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).symlink_to(path)
    with safe_open(str(src / TEXT_ENCODER_FILE), "np") as handle:
        tensors = {(k if k.startswith(PREFIX) else PREFIX + k): handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    target = out / TEXT_ENCODER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, target)
    return out


def sampler(scheduler: str | None) -> tuple[str, str]:
    """(sd.cpp sample method, note) for a request's scheduler name."""
    key = (scheduler or "").strip().lower()
    if key in SAMPLERS:
        return SAMPLERS[key], ""
    return "euler", f"sampler euler in place of {scheduler or 'the model default'} (stable-diffusion.cpp lacks it)"


LINE = re.compile(r"(get_learned_condition|decode_first_stage|sampling) completed, taking ([0-9.]+)s")


class SdcppSystem:
    """The worker side for stable-diffusion.cpp (``stable_diffusion_cpp.StableDiffusion``)."""

    name = "sdcpp"

    def __init__(self):
        self.sd, self.view, self.logged, self.steps_at = None, None, {}, []

    def info(self) -> dict:
        from importlib.metadata import version

        return {"stable_diffusion_cpp_python": version("stable-diffusion-cpp-python")}

    def _log(self, level: int, text: bytes, data) -> None:
        match = LINE.search(text.decode("utf-8", errors="replace"))
        if match:
            self.logged[match[1]] = float(match[2])

    def load(self, request: dict) -> dict:
        import tempfile

        import stable_diffusion_cpp as sd_cpp
        from stable_diffusion_cpp import StableDiffusion

        reason = support(request["model"])
        if reason:
            raise ValueError(reason)
        if request["batch"] != 1:
            raise ValueError("sdcpp peer measures batch 1 only")
        self._tmp = tempfile.TemporaryDirectory(prefix="sdrt-sdcpp-view-")
        view = sdcpp_view(request["model"], self._tmp.name)
        self.sd = StableDiffusion(model_path=str(view), n_threads=request["threads"], vae_decode_only=True,
                                  verbose=False)
        self._callback = sd_cpp.sd_log_callback(self._log)  # kept alive: ctypes does not hold it
        sd_cpp.sd_set_log_callback(self._callback, ctypes.c_void_p(0))
        return {"precision": "fp32 (the weights' own type)", "notes": sampler(request.get("scheduler"))[1]}

    def run(self, r: dict) -> dict:
        method, _ = sampler(r["scheduler"])
        self.logged.clear()
        marks = []
        start = time.perf_counter()
        self.sd.generate_image(prompt=r["prompt"], negative_prompt=r["negative_prompt"], width=r["width"],
                               height=r["height"], cfg_scale=r["guidance"], sample_method=method,
                               sample_steps=r["steps"], seed=r["seed"],
                               progress_callback=lambda step, steps, t: marks.append((step, time.perf_counter())))
        end_to_end = time.perf_counter() - start
        sampling = self.logged.get("sampling", 0.0)
        done = [t for step, t in marks if step >= 1][-r["steps"]:]  # sd.cpp may also report step 0 at the start
        begin = [t for step, t in marks if step == 0]
        steps = [b - a for a, b in zip(done, done[1:])]
        if begin and done:  # the step-0 report marks the start of sampling
            steps.insert(0, done[0] - begin[-1])
        else:  # first step: sampling total minus the others
            steps.insert(0, max(sampling - sum(steps), 0.0))
        return {"text_encoder": self.logged.get("get_learned_condition", 0.0), "unet_call": steps,
                "vae_decode": self.logged.get("decode_first_stage", 0.0), "end_to_end": end_to_end}


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    from sdrt.bench_worker import serve

    serve(SdcppSystem())
