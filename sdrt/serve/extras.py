"""Request fields added after the first version of the HTTP API, shared by the jobs, A1111 and OpenAI
endpoints. Each check raises ApiError(400) naming the field the client sent.

``rng``: whose generator the seeds reproduce, as the CLI's ``--rng`` (``cpu``, ``cuda``, ``cuda:GPU``).
A1111 names its source ``randn_source`` (``override_settings`` or ``POST /options``): ``CPU`` is torch's
CPU generator; ``GPU`` (A1111's default) is torch's generator on the GPU, i.e. torch's CUDA Philox on an
NVIDIA GPU; ``NV`` is A1111's numpy port of that CUDA generator (modules/rng_philox.py), equal to torch's
for every draw of at most SMs x threads-per-SM values. Both ``GPU`` and ``NV`` map to sdrt's ``cuda``
(the ``h100`` layout); name another GPU with sdrt's own ``rng`` field (``cuda:4090``).

LoRA: ``<lora:NAME[:WEIGHT]>`` tags in the prompt (every endpoint, as A1111) and the jobs API's ``loras``
name ``.safetensors`` files in ``sdrt serve --lora-dir DIR``; run-time LoRA as ``Pipeline(loras=...)``.

ControlNet (jobs API): ``control_images`` (base64, one per ControlNet in the artifact), ``control_scales``,
``control_start``, ``control_end``, ``guess_mode``, as ``Pipeline``'s keyword arguments (``sdrt.controlnet``).
"""

from __future__ import annotations

import math
import re

from sdrt.errors import InputError
from sdrt.serve import limits
from sdrt.serve.errors import ApiError
from sdrt.serve.executor import GenRequest, decode_png, encode_png

RANDN_SOURCES = {"CPU": "cpu", "GPU": "cuda", "NV": "cuda"}
_FLAG = re.compile(r"^--rng:?\s*")  # parse_rng's messages name the CLI flag
DEFAULT_RANDN_SOURCE = "CPU"  # sdrt's default (diffusers' CPU generator); A1111's own default is GPU


def rng_name(value, field: str = "rng") -> str:
    """The canonical ``--rng`` spelling of ``value`` (None: ``cpu``)."""
    if value is None:
        return "cpu"
    if not isinstance(value, str):
        raise ApiError(400, f"{field}: expected a string (cpu, cuda or cuda:GPU), got {type(value).__name__}")
    from sdrt.rng_cuda import parse_rng

    try:
        return parse_rng(value).name
    except InputError as exc:
        raise ApiError(400, f"{field}: {_FLAG.sub('', str(exc))}") from None


def randn_source(value, field: str = "randn_source") -> str:
    """A1111's ``randn_source`` (CPU, GPU, NV; any case) -> sdrt's rng name."""
    key = value.strip().upper() if isinstance(value, str) else None
    if key not in RANDN_SOURCES:
        raise ApiError(400, f"{field}: {value!r} is not a random number source; use CPU, GPU or NV")
    return RANDN_SOURCES[key]


def a1111_rng(payload: dict, default_source: str | None) -> str:
    """The rng of an A1111 request: sdrt's ``rng`` field, else ``override_settings.randn_source``, else the
    server's ``randn_source`` option (``POST /options``), else ``cpu``. ``rng`` and ``randn_source`` must agree."""
    overrides = payload.get("override_settings")
    source = overrides.get("randn_source") if isinstance(overrides, dict) else None
    from_source = None if source is None else randn_source(source, "override_settings.randn_source")
    if payload.get("rng") is not None:
        name = rng_name(payload["rng"])
        if from_source is not None and name.split(":")[0] != from_source:
            raise ApiError(400, f"rng: {payload['rng']!r} contradicts override_settings.randn_source {source!r}")
        return name
    if from_source is not None:
        return from_source
    return randn_source(default_source or DEFAULT_RANDN_SOURCE)


def _fraction(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{field}: expected a finite number, got {value!r}")
    return float(value)


def control(images, scales, start, end, guess_mode, info: dict, max_pixels: int) -> dict:
    """ControlNet fields (diffusers' ControlNet pipelines: one image per ControlNet the artifact holds, in
    export order, resized to the output size by the pipeline) -> GenRequest keyword arguments."""
    defaults = {"control_scales": (scales, None), "control_start": (start, 0.0), "control_end": (end, 1.0),
                "guess_mode": (guess_mode, False)}
    if not images:
        for field, (value, default) in defaults.items():
            if value not in (None, default):
                raise ApiError(400, f"{field}: given without control_images")
        return {}
    count = int(info.get("controlnets") or 0)
    if not count:
        raise ApiError(400, f"control_images: {info.get('name')!r} has no ControlNet (export one with `sdrt export "
                            "--controlnet DIR`)")
    if len(images) != count:
        raise ApiError(400, f"control_images: {len(images)} image(s) for the {count} ControlNet(s) of this artifact; "
                            "send one per ControlNet, in export order")
    pngs = tuple(encode_png(limits.flatten(limits.decode_image(image, f"control_images[{k}]", max_pixels)))
                 for k, image in enumerate(images))
    scales = [1.0] * count if scales is None else scales if isinstance(scales, list) else [scales] * count
    if len(scales) != count:
        raise ApiError(400, f"control_scales: {len(scales)} scale(s) for {count} ControlNet(s); send one per net")
    scales = tuple(_fraction(s, "control_scales") for s in scales)
    start, end = _fraction(start, "control_start"), _fraction(end, "control_end")
    if not 0.0 <= start < end <= 1.0:
        raise ApiError(400, f"control_start / control_end: {start} and {end} must satisfy 0 <= start < end <= 1 "
                            "(fractions of the denoising steps)")
    return {"control_pngs": pngs, "control_scales": scales, "control_start": start, "control_end": end,
            "guess_mode": bool(guess_mode)}


_BAD_NAME = re.compile(r"[/\\<>:\x00]|^\.|^$")


def _lora_pairs(entries) -> list[tuple[str, object]]:
    """The jobs API's ``loras``: [[NAME, WEIGHT], ...] or [{"name": NAME, "weight": WEIGHT}, ...] (weight 1.0)."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ApiError(400, "loras: expected a list of [NAME, WEIGHT] pairs or {name, weight} objects")
    pairs = []
    for k, entry in enumerate(entries):
        if isinstance(entry, dict) and set(entry) <= {"name", "weight"} and "name" in entry:
            pairs.append((entry["name"], entry.get("weight", 1.0)))
        elif isinstance(entry, list) and len(entry) in (1, 2):
            pairs.append((entry[0], entry[1] if len(entry) == 2 else 1.0))
        else:
            raise ApiError(400, f"loras[{k}]: expected [NAME, WEIGHT] or {{\"name\": NAME, \"weight\": WEIGHT}}")
        if not isinstance(pairs[-1][0], str):
            raise ApiError(400, f"loras[{k}]: the name must be a string")
        if isinstance(pairs[-1][1], bool) or not isinstance(pairs[-1][1], (int, float)):
            raise ApiError(400, f"loras[{k}]: the weight must be a number, got {pairs[-1][1]!r}")
    return pairs


def loras(prompt: str, entries, lora_dir, field: str = "prompt") -> dict:
    """GenRequest keyword arguments for the ``loras`` entries and the ``<lora:NAME[:WEIGHT]>`` tags of ``prompt``,
    checked here (400 naming the field): ``loras`` ((path, weight), ...) and ``lora_dir`` (when tags are present;
    the Pipeline resolves and removes them, as ``Pipeline(..., lora_dir=)``). Each NAME is a ``.safetensors``
    file in the server's ``--lora-dir`` (a plain name: no path, so a request names only that folder's files)."""
    from sdrt.lora import TAG, LoraError, extract_tags

    pairs, tags = _lora_pairs(entries), TAG.findall(prompt)
    if not (pairs or tags):
        return {}
    where = "loras" if pairs else field
    if not lora_dir:
        raise ApiError(400, f"{where}: LoRAs are named in the server's LoRA folder; start it with --lora-dir DIR")
    for name in [n for n, _ in pairs] + [t.split(":")[0] for t in tags]:
        if _BAD_NAME.search(name):
            raise ApiError(400, f"{where}: LoRA name {name!r} must be a file name in --lora-dir (no path, no ':')")
    try:
        listed = extract_tags("".join(f"<lora:{n}:{w!r}>" for n, w in pairs), lora_dir)[1] if pairs else []
        where = field
        extract_tags(prompt, lora_dir)
    except LoraError as exc:
        raise ApiError(400, f"{where}: {exc}") from None
    return {"loras": tuple(listed), "lora_dir": str(lora_dir) if tags else None}


def prior(steps, guidance, info: dict, options) -> dict:
    """Kandinsky 2.2's prior stage (``prior_steps``, ``prior_guidance``; sdrt extras in every endpoint)."""
    if steps is None and guidance is None:
        return {}
    field = "prior_steps" if steps is not None else "prior_guidance"
    if info.get("family") != "kandinsky22":
        raise ApiError(400, f"{field}: only Kandinsky 2.2 artifacts have a prior; {info.get('name')!r} is "
                            f"{info.get('family')}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 1 <= steps <= options.max_steps):
        raise ApiError(400, f"prior_steps: must be an integer in 1..{options.max_steps}, got {steps!r}")
    if guidance is not None and not 0 <= _fraction(guidance, "prior_guidance") <= 100:
        raise ApiError(400, f"prior_guidance: must be a number in 0..100, got {guidance!r}")
    return {"prior_steps": steps, "prior_guidance": None if guidance is None else float(guidance)}


def family_defaults(family: str) -> dict:
    """Steps and guidance a request that names neither gets: the family pipeline's defaults."""
    if family == "kandinsky22":  # sdrt.specs_kandinsky.FAMILY: diffusers' KandinskyV22CombinedPipeline
        from sdrt import specs_kandinsky as k

        return {"steps": k.DEFAULT_STEPS, "guidance": k.DEFAULT_GUIDANCE, "prior_steps": k.DEFAULT_PRIOR_STEPS,
                "prior_guidance": k.DEFAULT_PRIOR_GUIDANCE, "img2img_strength": k.DEFAULT_IMG2IMG_STRENGTH,
                "openai_steps": k.DEFAULT_STEPS}  # its DDPM decoder needs them: no quicker OpenAI default
    # the OpenAI endpoint's quicker default (its clients send no steps at all)
    return {"steps": 30, "guidance": 7.5, "img2img_strength": 0.75, "openai_steps": 20}


def pipeline_options(req: GenRequest) -> dict:
    """The Pipeline keyword arguments of ``req``'s optional fields, only those set (a family's pipeline
    need not take the others)."""
    options: dict = {"rng": req.rng} if req.rng != "cpu" else {}
    if req.loras:
        options["loras"] = [tuple(pair) for pair in req.loras]
    if req.lora_dir:
        options["lora_dir"] = req.lora_dir
    options.update({k: v for k, v in (("prior_steps", req.prior_steps), ("prior_guidance", req.prior_guidance))
                    if v is not None})
    if req.control_pngs:
        options.update(control_images=[decode_png(png, f"control_images[{k}]") for k, png in
                                       enumerate(req.control_pngs)],
                       control_scales=list(req.control_scales) or 1.0, control_start=req.control_start,
                       control_end=req.control_end, guess_mode=req.guess_mode)
    return options
