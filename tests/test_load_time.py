"""Load-time paths (issue 11): CPU-native graphs written by `sdrt export` / `build-engines --backend ort-cpu`
and opened without graph optimization; stale or damaged ones refused (a damaged graph never reaches ONNX Runtime;
weight data hashed while its session is created, which is dropped on a mismatch) and rebuilt; BLAKE3 records beside sha256 (old sha256-only manifests still checked); checks started ahead.
No timing assertions: benchmarks/load_time.py measures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import blake3
import numpy as np
import onnxruntime
import pytest

from sdrt.backends import ort_native
from sdrt.backends.ort_native import NATIVE, cpu_identity
from sdrt.errors import ArtifactError
from sdrt.manifest import Manifest, file_record, files_digest, load_manifest
from sdrt.pipeline import Pipeline

REQUEST = dict(steps=2, width=64, height=64, seed=5)
USED = ("text_encoder", "unet", "vae_decoder")
FAMILIES = {"sd": REQUEST, "kandinsky22": dict(REQUEST, prior_steps=2)}  # family -> its txt2img request


@pytest.fixture
def engines(tiny_engine_dir, tmp_path):
    return Path(shutil.copytree(tiny_engine_dir, tmp_path / "engines"))


@pytest.fixture(params=list(FAMILIES))
def family_engines(request, tmp_path) -> tuple[str, Path, Path]:
    """(family, its tiny ENGINE_DIR, a copy of it): SD's tiny_engine_dir, Kandinsky 2.2's from kandinsky_exports."""
    source = request.getfixturevalue("tiny_engine_dir") if request.param == "sd" else \
        request.getfixturevalue("kandinsky_exports")("tiny-kandinsky22")[1]
    return request.param, source, Path(shutil.copytree(source, tmp_path / "engines"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(ENGINE_DIR, family) -> the family's request's image from the exported ONNX (the artifact without its
    native graphs), computed once each."""
    images = {}

    def get(root: Path, family: str = "sd") -> np.ndarray:
        if root not in images:
            copy = Path(shutil.copytree(root, tmp_path_factory.mktemp("plain") / "engines"))
            edit(copy, lambda d: d["engines"].pop(NATIVE))
            images[root] = Pipeline(copy, threads=1).txt2img("a cat", **FAMILIES[family]).unit_images
        return images[root]

    return get


@pytest.fixture(scope="module")
def plain_images(plain, tiny_engine_dir):
    """The request's image from the tiny SD model's exported ONNX."""
    return plain(tiny_engine_dir)


def edit(root: Path, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def native_records(root: Path) -> dict:
    return load_manifest(root).engines(NATIVE)["components"]


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_records_native_graphs_for_this_cpu(tiny_engine_dir):
    manifest = load_manifest(tiny_engine_dir)
    records = native_records(tiny_engine_dir)
    assert sorted(records) == sorted(manifest.data["components"])
    for name, record in records.items():
        assert record["version"] == onnxruntime.__version__ and record["cpu"] == cpu_identity()
        assert record["cpu"]["flags"] and record["optimization_level"] == "ORT_ENABLE_ALL"
        assert record["source"] == "onnx" and record["source_sha256"] == manifest.onnx_digest(name)
        assert [f["path"] for f in record["files"]] == [f"{NATIVE}/{name}.onnx", f"{NATIVE}/{name}.onnx.data"]
        for file in record["files"]:
            manifest.check_file(file)
            assert file["blake3"] == blake3.blake3((tiny_engine_dir / file["path"]).read_bytes()).hexdigest()


def test_runtime_opens_native_graphs_without_optimization(tiny_engine_dir, opened, plain_images):
    result = Pipeline(tiny_engine_dir, threads=1).txt2img("a cat", **REQUEST)
    disabled = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert opened == [(f"{NATIVE}/{name}.onnx", disabled) for name in USED]
    np.testing.assert_allclose(result.unit_images, plain_images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stale", ["version", "cpu model", "cpu flags", "source"])
def test_stale_native_graph_refused_and_rebuilt(family_engines, opened, plain, caplog, stale):
    """SD and Kandinsky 2.2 (whose decoder UNet is ``unet`` too): refused, the portable graph run, rewritten."""
    family, source, engines = family_engines
    plain_images = plain(source, family)
    opened.clear()  # (the sessions of that plain run, when it ran just now)

    def change(data):
        record = data["engines"][NATIVE]["components"]["unet"]
        if stale == "version":
            record["version"] = "1.0.0"
        elif stale == "cpu model":
            record["cpu"]["model"] = "Some Other CPU"
        elif stale == "cpu flags":
            record["cpu"]["flags"] = [*record["cpu"]["flags"], "avx10_2"]
        else:
            record["source_sha256"] = "0" * 64

    edit(engines, change)
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        result = Pipeline(engines, threads=1).txt2img("a cat", **FAMILIES[family])
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith("unet:"), refused
    reason = {"version": "onnxruntime 1.0.0", "cpu model": "Some Other CPU", "cpu flags": "lacks avx10_2",
              "source": "another graph"}[stale]
    assert reason in refused[0]
    enable_all = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert ("engines/unet.onnx", enable_all) in opened  # the exported ONNX, optimized at load
    assert not any(path == f"{NATIVE}/unet.onnx" for path, _ in opened)
    np.testing.assert_allclose(result.unit_images, plain_images, rtol=0, atol=1e-5)
    record = native_records(engines)["unet"]  # rewritten on disk for this process
    assert record["version"] == onnxruntime.__version__ and record["cpu"] == cpu_identity()
    assert ort_native.problem(record, *ort_native.source_of(load_manifest(engines), "unet")) is None
    opened.clear()
    Pipeline(engines, threads=1).txt2img("a cat", **FAMILIES[family])
    assert (f"{NATIVE}/unet.onnx", onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL) in opened


@pytest.mark.parametrize("part", ["unet.onnx", "unet.onnx.data"])
def test_damaged_native_graph_refused_and_rebuilt(engines, opened, plain_images, caplog, part):
    """A damaged graph never reaches ONNX Runtime. Damaged weight data may be mapped by a session created
    while it is hashed (``ort._open_checked``), but that session is dropped, never called."""
    flip(engines / NATIVE / part)
    with caplog.at_level(logging.WARNING, logger="sdrt"):
        result = Pipeline(engines, threads=1).txt2img("a cat", **REQUEST)
    assert any("refused" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    native_opens = [i for i, (path, _) in enumerate(opened) if path == f"{NATIVE}/unet.onnx"]
    rewrite = opened.index(("engines/unet.onnx", onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL))
    assert native_opens == ([] if part == "unet.onnx" else [rewrite - 1])  # the dropped session only
    np.testing.assert_allclose(result.unit_images, plain_images, rtol=0, atol=1e-5)
    manifest = load_manifest(engines)
    for file in manifest.engines(NATIVE)["components"]["unet"]["files"]:
        manifest.check_file(file)  # the rewritten graph matches its new record


@pytest.mark.parametrize("opener_fails", [False, True])
def test_weights_hashed_while_opening_decide_the_outcome(tmp_path, opener_fails):
    """``_open_checked``: the graph is checked before the opener runs; a weight file that fails its digest
    drops the opened engine, and its error outranks the opener's own (garbage weights can fail a load)."""
    from sdrt.backends.ort import _open_checked

    for name in ("g.onnx", "g.onnx.data"):
        (tmp_path / name).write_bytes(os.urandom(1 << 20))
    records = [file_record(tmp_path, name) for name in ("g.onnx", "g.onnx.data")]
    seen = []

    def opener():
        seen.append("opened")
        if opener_fails:
            raise ArtifactError("ONNX Runtime cannot load g.onnx")
        return "engine"

    if opener_fails:  # intact files: the opener's own error
        with pytest.raises(ArtifactError, match="cannot load"):
            _open_checked(Manifest(tmp_path, {}), records, None, opener)
    else:
        assert _open_checked(Manifest(tmp_path, {}), records, None, opener) == "engine"
    flip(tmp_path / "g.onnx.data")
    with pytest.raises(ArtifactError, match="g.onnx.data does not match"):
        _open_checked(Manifest(tmp_path, {}), records, None, opener)
    flip(tmp_path / "g.onnx.data")
    flip(tmp_path / "g.onnx")
    seen.clear()
    with pytest.raises(ArtifactError, match="g.onnx does not match"):
        _open_checked(Manifest(tmp_path, {}), records, None, opener)
    assert seen == []  # a damaged graph is never opened


def test_read_only_artifact_falls_back_without_writing(engines, opened, plain_images, monkeypatch):
    edit(engines, lambda d: d["engines"][NATIVE]["components"]["unet"].update(version="1.0.0"))
    before = (engines / "manifest.json").read_bytes()
    monkeypatch.setattr(ort_native.os, "access", lambda path, mode: False)  # tests run as root: fake it
    result = Pipeline(engines, threads=1).txt2img("a cat", **REQUEST)
    np.testing.assert_allclose(result.unit_images, plain_images, rtol=0, atol=1e-5)
    assert (engines / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (engines / NATIVE).iterdir() if p.name.startswith(".unet")) == []


def test_build_engines_ort_cpu_writes_native_graphs_from_its_graphs(engines, tiny_model_dir, opened):
    from sdrt_export.build_engines import build_engines

    build_engines(tiny_model_dir, engines, "ort-cpu", progress=False)
    manifest = load_manifest(engines)
    ort_cpu = manifest.engines("ort-cpu")["components"]
    for name, record in native_records(engines).items():
        assert record["source"] == "ort-cpu" and record["source_sha256"] == files_digest(ort_cpu[name]["files"])
    stamps = {p.name: p.stat().st_mtime_ns for p in (engines / NATIVE).iterdir()}
    summary = build_engines(tiny_model_dir, engines, "ort-cpu", progress=False)
    assert summary["built"] == [] and "nothing to build" in summary["message"]
    assert {p.name: p.stat().st_mtime_ns for p in (engines / NATIVE).iterdir()} == stamps
    Pipeline(engines, threads=1).txt2img("a cat", **REQUEST)
    assert [path for path, _ in opened[-3:]] == [f"{NATIVE}/{name}.onnx" for name in USED]


def test_file_records_carry_both_digests(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    record = file_record(tmp_path, "w.bin")
    assert record == {"path": "w.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      "blake3": blake3.blake3(data).hexdigest()}
    assert file_record(tmp_path, "empty")["blake3"] == blake3.blake3(b"").hexdigest()


@pytest.mark.parametrize("kind", ["blake3 record", "old sha256-only record"])
def test_check_file_catches_same_size_tampering(tmp_path, kind):
    (tmp_path / "w.bin").write_bytes(os.urandom(1 << 20))
    record = file_record(tmp_path, "w.bin")
    if kind.startswith("old"):
        del record["blake3"]
    manifest = Manifest(tmp_path, {})
    manifest.check_file(record)
    flip(tmp_path / "w.bin")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        manifest.check_file(record)
    record["blake3"] = "0" * 64 if kind.startswith("old") else record["blake3"]
    with pytest.raises(ArtifactError):
        manifest.check_file(record)


def test_checks_started_ahead_are_rechecked_when_the_file_changes(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(os.urandom(1 << 20))
    records = [file_record(tmp_path, name) for name in ("a", "b")]
    manifest = Manifest(tmp_path, {})
    manifest.verify_ahead(records)
    manifest._ahead["a"].result(timeout=60)
    manifest.check_file(records[0])  # the background result, unchanged file
    assert "a" not in manifest._ahead
    manifest._ahead["b"].result(timeout=60)
    flip(tmp_path / "b")  # changed after its background check passed
    os.utime(tmp_path / "b", ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ArtifactError, match="b does not match"):
        manifest.check_file(records[1])
    flip(tmp_path / "a")
    manifest.verify_ahead(records[:1])  # a failed background check is an error at check_file too
    with pytest.raises(ArtifactError, match="a does not match"):
        manifest.check_file(records[0])


def test_check_ahead_starts_once_per_artifact(engines, monkeypatch):
    """The txt2img components are checked ahead once: an engine opened later (img2img's VAE encoder) checks
    only its own files, never re-hashing the open ones in the background."""
    pipe = Pipeline(engines, threads=1)
    pipe.txt2img("a cat", **REQUEST)
    queued, real = [], Manifest.verify_ahead

    def spy(self, records, threads=1):
        queued.extend(r["path"] for r in records)
        return real(self, records, threads)

    monkeypatch.setattr(Manifest, "verify_ahead", spy)
    pipe.engine("vae_encoder")
    assert queued and all("vae_encoder" in path for path in queued), queued
