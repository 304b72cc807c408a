"""The Python side of libsdrt, the C ABI in ``capi/sdrt.h``: C structs in, ``Pipeline`` calls, statuses out.

capi/_init.py (frozen into the library by cffi's embedding mode) calls ``start`` once and forwards
each ``sdrt__py_*`` entry point here. Every function returns 1 + an ``sdrt_status`` and stores its
one-line message with ``lib.sdrt__set_error``; no exception leaves this module. The argument rules
are the CLI's (sdrt.cli, sdrt.generate_cli): the same ``SdrtError`` subclasses become statuses.
Nothing imports cffi here: ``ffi``/``lib`` come from the library. The request structs' fields are
read by sdrt.capi_params.
"""

from __future__ import annotations

import gc
import io
import logging
import sys
import threading
from dataclasses import dataclass

import numpy as np

from sdrt import capi_params
from sdrt.capi_params import (  # noqa: F401  (re-exported: callers import them from here)
    MAX_LIST, MODES, PIL_MODES, PRIOR_GUIDANCE_DEFAULT, STRENGTH_DEFAULT, _count, _extras, _float, _image, _path, _rng,
    _text,
)
from sdrt.errors import ArtifactError, Cancelled, InputError, ModelError, NumericsError, SdrtError

log = logging.getLogger(__name__)

OK, ERR_INPUT, ERR_ARTIFACT, ERR_CANCELLED, ERR_INTERNAL, ERR_IO = 0, 2, 3, 4, 5, 6

ffi = lib = None
_contexts: dict[int, "_Context"] = {}
_local = threading.local()  # .context: the context whose call runs on this thread (log routing)
_log_stderr = False
_own_interpreter = True


@dataclass
class _Context:
    log_fn: object  # sdrt_log_fn cdata or None
    log_data: object
    log_level: int
    pipe: object = None


def _key(ctx) -> int:
    return int(ffi.cast("uintptr_t", ctx))


class _ToContextLog(logging.Handler):
    """Routes records to the log callback of the context running on this thread; without one, to
    stderr only when the host set SDRT_LOG_STDERR=1."""

    def emit(self, record):
        context = getattr(_local, "context", None)
        message = " ".join(record.getMessage().split())
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {' '.join(str(record.exc_info[1]).split())})"
        if context is not None and context.log_fn is not None:
            if record.levelno >= context.log_level:
                context.log_fn(record.levelno, message.encode("utf-8", "replace"), context.log_data)
        elif _log_stderr:
            sys.__stderr__.write(f"sdrt {record.levelname.lower()} {record.name}: {message}\n")

    def handleError(self, record):  # a failing log callback must not print a traceback
        pass


class _LogStream(io.TextIOBase):
    """sys.stdout / sys.stderr of an interpreter libsdrt started: lines become log records."""

    def __init__(self, level: int):
        self.level, self.pending = level, ""

    def writable(self):
        return True

    def write(self, text):
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                logging.getLogger("sdrt.stdio").log(self.level, "%s", line)
        return len(text)


def start(ffi_, lib_, own_interpreter: bool, log_stderr: bool) -> None:
    """Once per process: keep ffi/lib and route logging (and, in our own interpreter, stdio) to contexts."""
    global ffi, lib, _log_stderr, _own_interpreter
    ffi, lib, _log_stderr, _own_interpreter = ffi_, lib_, log_stderr, own_interpreter
    capi_params.bind(ffi_)
    handler = _ToContextLog(logging.DEBUG)
    if own_interpreter:
        logging.captureWarnings(True)
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        sys.stdout, sys.stderr = _LogStream(logging.INFO), _LogStream(logging.WARNING)
        import onnxruntime  # its C++ logger writes to fd 2; errors reach us as exceptions anyway

        onnxruntime.set_default_logger_severity(3 if log_stderr else 4)
    else:  # the host's interpreter: add a route for sdrt's records, change nothing else
        logging.getLogger("sdrt").addHandler(handler)
    _update_level()


def _update_level():
    """sdrt's logger passes the lowest level a context's callback asks for (WARNING by default); in a host's
    interpreter it is only ever lowered, never raised above what the host set."""
    levels = [c.log_level for c in _contexts.values() if c.log_fn is not None]
    logger, level = logging.getLogger("sdrt"), min(levels + [logging.WARNING])
    if _own_interpreter or level < logger.getEffectiveLevel():
        logger.setLevel(level)


def _call(ctx, context, work, *args, failure=ERR_INPUT) -> int:
    """Run ``work`` on behalf of ``ctx``; map its exception to a status and a one-line message."""
    previous, _local.context = getattr(_local, "context", None), context
    try:
        work(*args)
        return 1 + OK
    except Cancelled as exc:
        status, message = ERR_CANCELLED, str(exc)
    except (ArtifactError, ModelError) as exc:
        status, message = ERR_ARTIFACT, str(exc)
    except NumericsError as exc:
        status, message = ERR_INTERNAL, str(exc)
    except SdrtError as exc:
        status, message = (ERR_INPUT if isinstance(exc, InputError) else failure), str(exc)
    except BaseException as exc:  # a bug, MemoryError, an ONNX Runtime failure: never into C
        log.error("internal error", exc_info=True)
        status, message = ERR_INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    finally:
        _local.context = previous
    lib.sdrt__set_error(ctx, " ".join(message.split()).encode("utf-8", "replace"))
    return 1 + status



def open_context(ctx, p) -> int:
    context = _Context(p.log if p.log != ffi.NULL else None, p.log_user_data, p.log_level)

    def work():
        from sdrt.backends import BACKENDS
        from sdrt.pipeline import Pipeline

        backend = _text(p.backend, "backend", "ort-cpu")
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        from sdrt.cli import check_threads

        if p.threads < 0:
            raise InputError(f"threads must be >= 0 (0: the usable cores), got {p.threads}")
        check_threads(p.threads or None, "threads")
        context.pipe = Pipeline(_path(p.engine_dir), backend=backend, threads=p.threads or None)
        _contexts[_key(ctx)] = context
        _update_level()

    return _call(ffi.NULL, context, work)


def generate(ctx, p, epoch, images_out, count_out, seed_out) -> int:
    context = _contexts.get(_key(ctx))
    if context is None:
        lib.sdrt__set_error(ctx, b"sdrt_generate: ctx is not an open sdrt_context")
        return 1 + ERR_INPUT
    return _call(ctx, context, _generate, ctx, context.pipe, p, epoch, images_out, count_out, seed_out)


def _generate(ctx, pipe, p, epoch, images_out, count_out, seed_out) -> None:
    mode = _text(p.mode, "mode", "txt2img")
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    needs = {"txt2img": (), "img2img": ("init_image",), "inpaint": ("init_image", "mask_image")}[mode]
    inputs = {}
    for field in ("init_image", "mask_image"):
        pointer = getattr(p, field)
        if field in needs and pointer == ffi.NULL:
            raise InputError(f"{mode} needs {field}")
        if field not in needs and pointer != ffi.NULL:
            raise InputError(f"{field} is not used by {mode}; set it to NULL")
        if pointer != ffi.NULL:
            inputs[field] = _image(pointer, field)
    progress, user_data = p.progress, p.user_data

    def on_step(i, total, t, latents):
        if progress != ffi.NULL and progress(i + 1, total, user_data) != 0:
            return False
        if lib.sdrt__cancelled(ctx, epoch):
            raise Cancelled(f"cancelled by sdrt_cancel at step {i + 1}/{total}")
        return None

    if lib.sdrt__cancelled(ctx, epoch):
        raise Cancelled("cancelled by sdrt_cancel before the first step")
    options = {"negative_prompt": _text(p.negative_prompt, "negative_prompt", ""), "steps": p.steps,
               "guidance": _float(p.guidance), "seed": None if p.seed == -1 else int(p.seed),
               "width": p.width or None, "height": p.height or None,
               "scheduler": _text(p.scheduler, "scheduler"), "batch": p.batch, "callback": on_step,
               "vae": _text(p.vae, "vae", "full"), "rng": _rng(_text(p.rng, "rng", "cpu"))}
    options.update(_extras(pipe, p))
    prompt = _text(p.prompt, "prompt")
    strength = None if p.strength == STRENGTH_DEFAULT else _float(p.strength)
    if mode == "txt2img":
        result = pipe.txt2img(prompt, **options)
    elif mode == "img2img":
        result = pipe.img2img(inputs["init_image"], prompt, **({} if strength is None else {"strength": strength}),
                              **options)  # the family's default strength (SD 0.75, Kandinsky 0.3)
    else:
        result = pipe.inpaint(inputs["init_image"], inputs["mask_image"], prompt, strength=strength, **options)
    pixels = result.images  # (N, H, W, 3) uint8, often not C-contiguous: copied once, straight into C memory
    count, height, width, channels = pixels.shape
    images = lib.sdrt__alloc_images(count, width, height, channels)
    if images == ffi.NULL:
        raise MemoryError(f"cannot allocate {count} images of {width}x{height}")
    for i in range(count):
        target = np.frombuffer(ffi.buffer(images[i].data, height * width * channels), np.uint8)
        target.reshape(height, width, channels)[...] = pixels[i]
    images_out[0], count_out[0], seed_out[0] = images, count, result.seed


def save_png(image, path, parameters) -> int:
    def work():
        from sdrt.images import save_png as save

        target = _path(path)
        if not target.lower().endswith(".png"):
            raise InputError(f"path must name a .png file, got {target}")
        picture = np.asarray(_image(image, "image"))
        save(picture, target, _text(parameters, "parameters"))

    return _call(ffi.NULL, getattr(_local, "context", None), work, failure=ERR_IO)


def close_context(ctx) -> int:
    context = _contexts.pop(_key(ctx), None)

    def work():
        if context is not None:
            context.pipe = None
            _update_level()
            gc.collect()  # the Pipeline holds reference cycles; free its ONNX Runtime sessions now

    return _call(ffi.NULL, context, work)
