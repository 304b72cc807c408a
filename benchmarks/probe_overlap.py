"""Lever 5 of NOTES.md "Load time": the native UNet's BLAKE3 check, its session creation, and both at once.

    python benchmarks/probe_overlap.py ENGINE_DIR {hash,session,both} [--component unet]

One fresh process per call (run the modes alternately); prints wall and CPU seconds of the mode.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time
from pathlib import Path


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", type=Path)
    parser.add_argument("mode", choices=("hash", "session", "both"))
    parser.add_argument("--component", default="unet")
    args = parser.parse_args()
    import onnxruntime as ort

    from sdrt import machine
    from sdrt.backends.ort import native_options
    from sdrt.manifest import blake3_file, load_manifest

    record = load_manifest(args.engines).engines("ort-cpu-native")["components"][args.component]
    graph, data = (args.engines / f["path"] for f in record["files"])
    print(machine.describe(machine.cpu_info(2)))
    start, cpu0 = time.perf_counter(), cpu()
    if args.mode == "hash":
        blake3_file(data, 1)
    elif args.mode == "session":
        ort.InferenceSession(str(graph), native_options(2))
    else:
        hashing = threading.Thread(target=blake3_file, args=(data, 1))
        hashing.start()
        ort.InferenceSession(str(graph), native_options(2))
        print(f"session done at {time.perf_counter() - start:.2f} s")
        hashing.join()
    print(f"{args.mode}: wall {time.perf_counter() - start:.2f} s, CPU {cpu() - cpu0:.2f} s")


if __name__ == "__main__":
    main()
