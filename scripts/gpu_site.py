"""Pure-Python test packages for ``make gpu-test`` on a GPU box without internet.

``download DIR`` (here, in .venv): fetch the wheels of the packages below at the versions this venv has.
``unpack DIR SITE`` (there, with the GPU box's python): unpack into SITE the wheels whose distribution that
python lacks — pure-Python wheels are importable once unzipped; nothing it already has is shadowed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
import zipfile
from pathlib import Path

# what a CUDA python with torch, cupy and onnxruntime typically lacks of the GPU tests' needs
PACKAGES = ("diffusers", "importlib-metadata", "zipp", "array-api-strict", "polygraphy", "onnx-graphsurgeon",
            "safetensors", "huggingface-hub")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def download(folder: str) -> None:
    specs = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    folder, *specs], check=True)


def unpack(folder: str, site: str) -> None:
    have = {_normal(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
    Path(site).mkdir(parents=True, exist_ok=True)
    for wheel in sorted(Path(folder).glob("*.whl")):
        name = _normal(wheel.name.split("-")[0])
        if name in have:
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        sys.stdout.write(f"gpu-test: {name} unpacked from {wheel.name}\n")


if __name__ == "__main__":
    {"download": download, "unpack": unpack}[sys.argv[1]](*sys.argv[2:])
