"""The diffusers side of ``sdrt bench --compare-diffusers``: a worker (``python -m sdrt_export.bench_diffusers``)
serving timed runs of the matching diffusers pipeline, stages timed by hooks on its modules.

Stages as sdrt names them: ``text_encoder`` (forward hooks on each text encoder, SDXL's second too; diffusers
calls each once per prompt half),
``tokenize`` (``encode_prompt`` minus the text encoder), ``unet_call`` (forward hooks),
``loop_overhead_step`` (step wall time minus UNet time, averaged over steps; a step ends at
``callback_on_step_end``, the first starts when ``prepare_extra_step_kwargs`` returns),
``vae_decode``/``vae_encode`` (wrapped methods) and ``end_to_end`` (the pipeline call).
"""

from __future__ import annotations

import functools
import sys
import time

import torch

from sdrt.bench import bench_image
from sdrt.bench_worker import serve
from sdrt_export.verify import load_reference, use_scheduler


class DiffusersSystem:
    name = "diffusers"

    def __init__(self):
        self.pipe, self.scheduler_name, self.base_scheduler = None, None, None
        self.t: dict = {}

    def info(self) -> dict:
        import diffusers

        return {"torch": torch.__version__, "diffusers": diffusers.__version__}

    def load(self, request: dict) -> dict:
        torch.set_num_threads(request["threads"])
        self.pipe = load_reference(request["model"], request["mode"])
        self.base_scheduler = self.pipe.scheduler
        self._hook()
        return {"precision": {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
            self.pipe.unet.dtype, str(self.pipe.unet.dtype))}

    def _hook(self) -> None:
        pipe, t = self.pipe, self.t
        starts: dict = {}

        def pre(stage, module, args, kwargs=None):
            starts[stage] = time.perf_counter()

        def post(stage, module, args, output):
            t.setdefault(stage, []).append(time.perf_counter() - starts[stage])

        encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]  # SDXL: 2
        for stage, module in [("text_encoder", m) for m in encoders] + [("unet_call", pipe.unet)]:
            module.register_forward_pre_hook(functools.partial(pre, stage))
            module.register_forward_hook(functools.partial(post, stage))

        def timed(stage, method):
            @functools.wraps(method)
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    t.setdefault(stage, []).append(time.perf_counter() - start)
            return wrapper

        pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
        pipe.vae.encode = timed("vae_encode", pipe.vae.encode)
        pipe.encode_prompt = timed("encode_prompt", pipe.encode_prompt)
        prepare = pipe.prepare_extra_step_kwargs

        def loop_start(*args, **kwargs):
            out = prepare(*args, **kwargs)
            t["step_marks"] = [time.perf_counter()]
            return out

        pipe.prepare_extra_step_kwargs = loop_start

    def _step_end(self, pipe, i, timestep, callback_kwargs) -> dict:
        self.t["step_marks"].append(time.perf_counter())
        return {}

    def run(self, r: dict) -> dict:
        if r["scheduler"] != self.scheduler_name:
            self.pipe.scheduler = self.base_scheduler
            use_scheduler(self.pipe, r["scheduler"])
            self.scheduler_name = r["scheduler"]
        self.t.clear()
        kwargs = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"] or None,
                      num_inference_steps=r["steps"], guidance_scale=r["guidance"],
                      num_images_per_prompt=r["batch"], output_type="np",
                      generator=torch.Generator("cpu").manual_seed(r["seed"]), callback_on_step_end=self._step_end)
        if r["mode"] == "img2img":
            kwargs.update(image=bench_image(r["width"], r["height"]), strength=r["strength"])
        else:
            kwargs.update(width=r["width"], height=r["height"])
        start = time.perf_counter()
        self.pipe(**kwargs)
        end_to_end = time.perf_counter() - start
        t = self.t
        marks, unet = t["step_marks"], t["unet_call"]
        text = sum(t["text_encoder"])
        out = {"tokenize": sum(t["encode_prompt"]) - text, "text_encoder": text, "unet_call": list(unet),
               "loop_overhead_step": (marks[-1] - marks[0] - sum(unet)) / len(unet),
               "vae_decode": sum(t["vae_decode"]), "end_to_end": end_to_end}
        if "vae_encode" in t:
            out["vae_encode"] = sum(t["vae_encode"])
        return out


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve(DiffusersSystem())
