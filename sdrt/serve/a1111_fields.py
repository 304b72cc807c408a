"""A1111 request fields -> sdrt: sampler + scheduler names, seeds, and the fields sdrt refuses.

Clients (``webuiapi``) send ~45 fields on every call; those at a value that does not change the image
are accepted, those that would change it in a way sdrt does not implement get 400 naming the field.
"""

from __future__ import annotations

import secrets

from sdrt.serve.errors import ApiError

# A1111 sampler name -> (sdrt scheduler name, its Karras variant or None, A1111 aliases)
SAMPLERS = {
    "DPM++ 2M": ("DPM++ 2M", "DPM++ 2M Karras", ["k_dpmpp_2m"]),
    "Euler a": ("Euler a", None, ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("Euler", "Euler Karras", ["k_euler"]),
    "LMS": ("LMS", "LMS Karras", ["k_lms"]),
    "Heun": ("Heun", "Heun Karras", ["k_heun"]),
    "DDIM": ("DDIM", None, ["ddim"]),
    "PLMS": ("PLMS", None, ["plms"]),
    "UniPC": ("UniPC", None, ["unipc"]),
    "LCM": ("LCM", None, ["k_lcm"]),
    "DDPM": ("DDPM", None, ["ddpm"]),
}
ANCESTRAL = {"Euler a", "DDPM"}  # samplers whose noise A1111's eta scales (1.0 = what sdrt draws)
# A1111 schedule types: "automatic" is the sampler's own; "karras" its Karras-sigma variant
SCHEDULES = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "karras", "label": "Karras", "aliases": ["Karras"], "default_rho": 7.0, "need_inner_model": False},
]


def samplers_list() -> list[dict]:
    """``GET /sdapi/v1/samplers``: name, aliases, options."""
    out = []
    for name, (_, karras, aliases) in SAMPLERS.items():
        options = {"scheduler": "karras"} if karras and name == "DPM++ 2M" else {}
        out.append({"name": name, "aliases": aliases, "options": options})
    return out


def _norm(text: str) -> str:
    return text.strip().lower()


_BY_NAME = {_norm(n): n for n in SAMPLERS} | {_norm(a): n for n, v in SAMPLERS.items() for a in v[2]}


def resolve_sampler(sampler_name, scheduler, sampler_index=None) -> tuple[str | None, str | None, dict]:
    """(sdrt scheduler name or None for the model's own, label for the infotext, extra infotext fields).

    Accepts "DPM++ 2M" + "Karras", "Euler a" + "automatic", legacy "DPM++ 2M Karras" (scheduler in the name)."""
    name = sampler_name if sampler_name not in (None, "") else sampler_index
    if name in (None, ""):
        if scheduler not in (None, "", "automatic", "Automatic"):
            raise ApiError(400, f"scheduler: {scheduler!r} needs a sampler_name")
        return None, None, {}
    if not isinstance(name, str):
        raise ApiError(400, "sampler_name: expected a string")
    field = "sampler_name" if sampler_name not in (None, "") else "sampler_index"
    key, schedule = _norm(name), None
    if key not in _BY_NAME and key.endswith(" karras"):
        key, schedule = key[: -len(" karras")], "karras"
    if key not in _BY_NAME:
        raise ApiError(400, f"{field}: unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    sampler = _BY_NAME[key]
    if scheduler not in (None, ""):
        if not isinstance(scheduler, str):
            raise ApiError(400, "scheduler: expected a string")
        given = _norm(scheduler)
        if given not in ("automatic", "karras"):
            raise ApiError(400, f"scheduler: {scheduler!r} is not available; sdrt offers Automatic and Karras")
        if given == "karras":
            schedule = "karras"
    plain, karras, _ = SAMPLERS[sampler]
    if schedule == "karras":
        if karras is None:
            raise ApiError(400, f"scheduler: Karras is not available with sampler {sampler!r}")
        return karras, sampler, {"Schedule type": "Karras"}
    return plain, sampler, {}


def seeds_for(seed, count: int) -> tuple[int, ...]:
    """A1111: seed -1 (or missing) = random; image k uses seed + k."""
    if seed is None or seed == -1 or seed == "":
        seed = secrets.randbelow(2**32 - count)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ApiError(400, f"seed: expected an integer, got {seed!r}")
    if not -2**63 <= seed <= 2**64 - count:
        raise ApiError(400, f"seed: {seed} is outside [-2**63, 2**64 - {count}]")
    return tuple(seed + k for k in range(count))


def _is_off(value, *off) -> bool:
    return value in (None, *off)


def refuse_unsupported(payload: dict, sampler: str | None, model_name: str) -> None:
    """400 naming the first field whose value would change the image in a way sdrt does not implement."""
    checks = [
        ("enable_hr", lambda v: _is_off(v, False), "hires fix is not implemented"),
        ("restore_faces", lambda v: _is_off(v, False), "face restoration is not implemented"),
        ("tiling", lambda v: _is_off(v, False), "tiling is not implemented"),
        ("script_name", lambda v: _is_off(v, ""), "scripts are not implemented"),
        ("script_args", lambda v: _is_off(v, []), "scripts are not implemented"),
        ("alwayson_scripts", lambda v: _is_off(v, {}), "always-on scripts are not implemented"),
        ("styles", lambda v: _is_off(v, []), "prompt styles are not implemented; put the text in the prompt"),
        ("subseed_strength", lambda v: _is_off(v, 0, 0.0), "variation seeds are not implemented"),
        ("seed_resize_from_h", lambda v: v is None or (isinstance(v, (int, float)) and v <= 0),
         "seed resize is not implemented"),
        ("seed_resize_from_w", lambda v: v is None or (isinstance(v, (int, float)) and v <= 0),
         "seed resize is not implemented"),
        ("s_churn", lambda v: _is_off(v, 0, 0.0), "sigma churn is not implemented"),
        ("s_noise", lambda v: _is_off(v, 1, 1.0), "a noise multiplier other than 1 is not implemented"),
        ("refiner_checkpoint", lambda v: _is_off(v, ""), "refiners are not implemented"),
        ("infotext", lambda v: _is_off(v, ""), "parsing an infotext into the request is not implemented"),
        ("save_images", lambda v: _is_off(v, False), "sdrt serve does not save images on the server"),
        ("initial_noise_multiplier", lambda v: _is_off(v, 1, 1.0), "a noise multiplier other than 1 is not "
                                                                    "implemented"),
        ("latent_mask", lambda v: _is_off(v, ""), "a separate latent mask is not implemented"),
        ("mask_round", lambda v: _is_off(v, True), "the pipeline rounds the latent mask (A1111's mask_round true)"),
        ("resize_mode", lambda v: _is_off(v, 0), "only resize_mode 0 (just resize) is implemented"),
        ("inpainting_fill", lambda v: _is_off(v, 0, 1), "only inpainting_fill 0 (fill) and 1 (original) are "
                                                        "implemented"),
    ]
    for field, ok, why in checks:
        if field in payload and not ok(payload[field]):
            raise ApiError(400, f"{field}: {payload[field]!r} is not supported ({why})")
    eta = payload.get("eta")
    if eta is not None and sampler in ANCESTRAL and eta != 1:
        raise ApiError(400, f"eta: {eta!r} is not supported with {sampler} (sdrt draws the full ancestral noise, "
                            "eta 1)")
    if eta is not None and sampler == "DDIM" and eta != 0:
        raise ApiError(400, f"eta: {eta!r} is not supported with DDIM (sdrt runs deterministic DDIM, eta 0)")
    refuse_overrides(payload.get("override_settings"), model_name)


ALLOWED_OVERRIDES = {"CLIP_stop_at_last_layers": (1,), "eta_noise_seed_delta": (0,), "samples_format": ("png",)}


def refuse_overrides(overrides, model_name: str) -> None:
    if overrides in (None, {}):
        return
    if not isinstance(overrides, dict):
        raise ApiError(400, "override_settings: expected an object")
    for key, value in overrides.items():
        if key == "randn_source":  # checked and used by extras.a1111_rng / POST /options
            continue
        if key == "sd_model_checkpoint":
            if not names_model(value, model_name):
                raise ApiError(400, f"override_settings.sd_model_checkpoint: {value!r} is not the loaded model "
                                    f"{model_name!r}")
        elif key not in ALLOWED_OVERRIDES or value not in ALLOWED_OVERRIDES[key]:
            raise ApiError(400, f"override_settings.{key}: {value!r} is not supported")


def names_model(value, model_name: str) -> bool:
    """Whether an A1111 checkpoint title names the loaded artifact ("name", "name [hash]", "name.onnx")."""
    if not isinstance(value, str):
        return False
    title = value.split(" [")[0].strip()
    return title in (model_name, f"{model_name}.onnx", f"{model_name}.safetensors")
