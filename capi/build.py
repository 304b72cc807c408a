"""Build libsdrt (the C ABI of capi/sdrt.h) with cffi's embedding mode: ``python capi/build.py [OUTDIR]``.

Writes OUTDIR/libsdrt.so, OUTDIR/sdrt.pc and OUTDIR/txt2img (examples/c/txt2img.c); OUTDIR defaults
to build/capi. Run it with the Python of the environment the library should use (``make capi`` runs
the project venv's): its sys.prefix is baked into the library (capi/glue.c starts Python as that
environment's bin/python would run, so its site-packages and pyvenv.cfg apply), and
the library links that Python's libpython with an rpath, so hosts need no environment variables.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PUBLIC = ["sdrt_abi_version", "sdrt_version", "sdrt_context_params_init", "sdrt_generate_params_init",
          "sdrt_context_open", "sdrt_generate", "sdrt_images_free", "sdrt_image_save_png", "sdrt_cancel",
          "sdrt_last_error", "sdrt_context_close"]

# C helpers Python calls (capi/helpers.c; sdrt__env: capi/pyenv.c)
HELPERS = """
void sdrt__set_error(sdrt_context *ctx, const char *message);
const char *sdrt__env(int key);
sdrt_image *sdrt__alloc_images(int count, uint32_t width, uint32_t height, uint32_t channels);
int sdrt__cancelled(const sdrt_context *ctx, uint32_t epoch);
"""
# entry points implemented in Python (capi/_init.py); each returns 1 + sdrt_status, 0 if Python failed
ENTRY_POINTS = """
int sdrt__py_open(sdrt_context *ctx, const sdrt_context_params *p);
int sdrt__py_generate(sdrt_context *ctx, const sdrt_generate_params *p, uint32_t epoch,
                      sdrt_image **images, int *count, int64_t *seed);
int sdrt__py_save_png(const sdrt_image *image, const char *path, const char *parameters);
int sdrt__py_close(sdrt_context *ctx);
"""


def c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def environment() -> dict:
    """What glue.c bakes in: this interpreter's sys.prefix (a venv or an installation) and its libpython."""
    libdir = sysconfig.get_config_var("LIBDIR")
    shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    return {"prefix": sys.prefix, "libdir": libdir, "shared": shared,
            "libpython": str(Path(libdir) / soname) if shared else "",
            "version": f"{sys.version_info.major}.{sys.version_info.minor}"}


def link_flags(env: dict, out: Path) -> list[str]:
    """libpython with an rpath; a static-only Python is linked in whole (needs a -fPIC libpython.a)."""
    ldversion = sysconfig.get_config_var("LDVERSION")
    syslibs = shlex.split(sysconfig.get_config_var("LIBS") or "") + shlex.split(
        sysconfig.get_config_var("SYSLIBS") or "")
    script = out / "libsdrt.map"
    exported = "".join(f"    {name};\n" for name in PUBLIC)
    if env["shared"]:
        script.write_text(f"{{\n  global:\n{exported}  local: *;\n}};\n")
        python = [f"-L{env['libdir']}", f"-lpython{ldversion}", f"-Wl,-rpath,{env['libdir']}"]
    else:  # the Python symbols stay exported: extension modules resolve against this library
        archive = Path(sysconfig.get_config_var("LIBPL")) / f"libpython{ldversion}.a"
        if not archive.exists():
            sys.exit(f"capi/build.py: {sys.executable} has neither a shared libpython nor {archive}; "
                     "use a Python built with --enable-shared")
        script.write_text("{\n  global: *;\n};\n")
        python = ["-Wl,--whole-archive", str(archive), "-Wl,--no-whole-archive"]
    # an absolute SONAME: a program linked with a plain `-L OUTDIR -lsdrt` records this path and finds the
    # library with no rpath or LD_LIBRARY_PATH (to move the library, rebuild it into its new folder)
    return python + syslibs + ["-ldl", "-lpthread", "-lm", f"-Wl,--version-script={script}",
                               f"-Wl,-soname,{out / 'libsdrt.so'}", "-Wl,--no-undefined"]


def build(out: Path, cc: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    header = (HERE / "sdrt.h").read_text()
    decls = header.split("BEGIN CFFI DECLARATIONS", 1)[1].split("*/", 1)[1].split("/* END CFFI DECLARATIONS")[0]
    version = metadata.version("sdrt")
    baked = {"SDRT_BAKED_PREFIX": env["prefix"], "SDRT_BAKED_LIBPYTHON": env["libpython"], "SDRT_PY_VERSION": env["version"], "SDRT_VERSION_STRING": version}
    preamble = "".join(f"#define {k} {c_string(v)}\n" for k, v in baked.items())

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(decls + HELPERS)
    ffibuilder.embedding_api(ENTRY_POINTS)
    ffibuilder.set_source("_sdrt_capi", preamble + '#include "glue.c"\n')
    ffibuilder.embedding_init_code((HERE / "_init.py").read_text())
    source = out / "_sdrt_capi.c"
    ffibuilder.emit_c_code(str(source))

    library = out / "libsdrt.so"
    includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
    command = [cc, "-shared", "-fPIC", "-O2", "-g", "-DNDEBUG", "-Wall", "-Wno-format-truncation", f"-I{HERE}",
               *[f"-I{p}" for p in sorted(includes)], str(source), "-o", str(library) + ".tmp",
               *link_flags(env, out)]
    subprocess.run(command, check=True)
    os.replace(str(library) + ".tmp", library)

    (out / "sdrt.pc").write_text(
        f"libdir={out}\nincludedir={HERE}\n\nName: sdrt\nDescription: C ABI of sdrt, a torch-free Stable "
        f"Diffusion runtime (embeds {sys.prefix})\nVersion: {version}\nCflags: -I${{includedir}}\n"
        "Libs: -L${libdir} -Wl,-rpath,${libdir} -lsdrt\n")
    example = ROOT / "examples" / "c" / "txt2img.c"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", f"-I{HERE}", str(example), "-o",
                    str(out / "txt2img"), f"-L{out}", f"-Wl,-rpath,{out}", "-lsdrt"], check=True)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "build" / "capi"))
    parser.add_argument("--cc", default=os.environ.get("CC", "cc"))
    args = parser.parse_args()
    print(build(Path(args.out).resolve(), args.cc))


if __name__ == "__main__":
    main()
