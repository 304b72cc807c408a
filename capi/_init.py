# libsdrt's embedding init code (cffi ``embedding_init_code``; capi/build.py freezes this file into
# the library).  It runs once, on the first call that enters Python (glue.c has started the interpreter
# as the environment's bin/python would run), imports sdrt.capi_impl and defines the ``sdrt__py_*`` entry points.
# The entry points are thin: each returns 1 + an sdrt_status, and never lets an exception out (a
# failed start is reported through sdrt_last_error, not printed).
import sys

from _sdrt_capi import ffi, lib


def _env(key):
    return ffi.string(lib.sdrt__env(key)).decode(sys.getfilesystemencoding(), "surrogateescape")


_impl = None
_start_error = None
try:
    _host_python = _env(3) == "1"
    from sdrt import capi_impl as _impl

    _impl.start(ffi, lib, own_interpreter=not _host_python, log_stderr=_env(4) == "1")
except BaseException as _exc:  # reported by every entry point, never printed
    _impl = None
    _start_error = ("libsdrt: the sdrt Python runtime failed to start (%s: %s); sys.path: %s"
                    % (type(_exc).__name__, " ".join(str(_exc).split()), sys.path))


def _no_runtime(ctx):
    lib.sdrt__set_error(ctx, _start_error.encode("utf-8", "replace"))
    return 1 + 5  # SDRT_ERR_INTERNAL


def _onerror(exc_type, exc_value, tb):
    """Last resort when an entry point raised past capi_impl's own handler: report, do not print."""
    try:
        lib.sdrt__set_error(ffi.NULL, ("libsdrt: internal error: %s: %s" % (exc_type.__name__, exc_value))
                            .encode("utf-8", "replace"))
    except BaseException:
        pass
    return 1 + 5


@ffi.def_extern(error=0, onerror=_onerror)
def sdrt__py_open(ctx, p):
    return _impl.open_context(ctx, p) if _impl else _no_runtime(ffi.NULL)


@ffi.def_extern(error=0, onerror=_onerror)
def sdrt__py_generate(ctx, p, epoch, images, count, seed):
    return _impl.generate(ctx, p, epoch, images, count, seed) if _impl else _no_runtime(ctx)


@ffi.def_extern(error=0, onerror=_onerror)
def sdrt__py_save_png(image, path, parameters):
    return _impl.save_png(image, path, parameters) if _impl else _no_runtime(ffi.NULL)


@ffi.def_extern(error=0, onerror=_onerror)
def sdrt__py_close(ctx):
    return _impl.close_context(ctx) if _impl else 1
