"""The folder side of ``sdrt export``: the model folder checked and hashed, tokenizer files copied, the
artifact built in a temporary sibling and moved into place (never a half-written ENGINE_DIR)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sdrt.errors import ExportError, ModelError
from sdrt.manifest import file_record, sha256_file
from sdrt_export.wrappers import SDXL_PIPELINES, SUPPORTED_PIPELINES, read_json

log = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


# --- model folder ------------------------------------------------------------------------------------

def validate_model_dir(model) -> Path:
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a folder (expected a diffusers pipeline folder)")
    try:
        entries = {p.name for p in path.iterdir()}
    except OSError as exc:
        raise ModelError(f"cannot read model folder {path}: {exc.strerror or exc}") from None
    if "model_index.json" not in entries:
        raise ModelError(f"{path} is not a Stable Diffusion pipeline (no model_index.json)")
    class_name = read_json(path / "model_index.json").get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ModelError(f"unsupported architecture {class_name or '(no _class_name)'} in {path}/model_index.json; "
                         f"supported: {', '.join(SUPPORTED_PIPELINES)}")
    missing = [f"{name}/" for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelError(f"{path} is not a Stable Diffusion pipeline (missing {', '.join(missing)})")
    missing = [f"{name}/" for name in SDXL_SUBFOLDERS if class_name in SDXL_PIPELINES and not (path / name).is_dir()]
    if missing:
        raise ModelError(f"{path}: a {class_name} lacks {', '.join(missing)}; supported: SDXL folders with both "
                         "text encoders and tokenizers")
    return path


def visible_files(path: Path) -> list[tuple[str, Path]]:
    """A folder's files as (relative POSIX path, path), sorted, hidden entries (and what is under them) skipped."""
    files = []
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if not any(part.startswith(".") for part in rel.split("/")):
            files.append((rel, file))
    return files


def hash_folder(path: Path) -> str:
    """sha256 over the sorted relative paths and sha256 of every file (hidden entries skipped)."""
    digest = hashlib.sha256()
    for rel, file in visible_files(path):
        digest.update(f"{rel}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# --- folder-level steps ------------------------------------------------------------------------------

def copy_tokenizer(model_dir: Path, work: Path, name: str = "tokenizer") -> list[dict]:
    src, dst = model_dir / name, work / name
    dst.mkdir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "tokenizer.json").is_file():
        from transformers import CLIPTokenizer

        with tempfile.TemporaryDirectory(dir=work) as scratch:
            CLIPTokenizer.from_pretrained(str(src)).save_pretrained(scratch)
            for name in ("tokenizer.json", "special_tokens_map.json"):
                if (Path(scratch) / name).is_file() and not (dst / name).is_file():
                    shutil.copy2(Path(scratch) / name, dst / name)
    if not (dst / "tokenizer.json").is_file():
        raise ExportError(f"could not create tokenizer.json from {src}")
    return [file_record(work, f"{dst.name}/{p.name}") for p in sorted(dst.iterdir())]  # tokenizer_2 too


def make_temp_dir(out: Path, created: list[Path]) -> Path:
    """The temp sibling of ``out``, creating missing parents (appended to ``created``, innermost first,
    so a failure can remove them)."""
    make_parents(out, created)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def make_parents(out: Path, created: list[Path]) -> None:
    """Create ``out``'s missing parents, appending each to ``created`` (innermost first)."""
    missing = []
    parent = out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir()
        created.insert(0, folder)


def move_into_place(work: Path, out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        os.replace(work, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(work, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
