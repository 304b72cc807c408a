"""Request fields added after the first version of the HTTP API, shared by the jobs, A1111 and OpenAI
endpoints. Each check raises ApiError(400) naming the field the client sent.

``rng``: whose generator the seeds reproduce, as the CLI's ``--rng`` (``cpu``, ``cuda``, ``cuda:GPU``).
A1111 names its source ``randn_source`` (``override_settings`` or ``POST /options``): ``CPU`` is torch's
CPU generator; ``GPU`` (A1111's default) is torch's generator on the GPU, i.e. torch's CUDA Philox on an
NVIDIA GPU; ``NV`` is A1111's numpy port of that CUDA generator (modules/rng_philox.py), equal to torch's
for every draw of at most SMs x threads-per-SM values. Both ``GPU`` and ``NV`` map to sdrt's ``cuda``
(the ``h100`` layout); name another GPU with sdrt's own ``rng`` field (``cuda:4090``).
"""

from __future__ import annotations

import re

from sdrt.errors import InputError
from sdrt.serve.errors import ApiError

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
