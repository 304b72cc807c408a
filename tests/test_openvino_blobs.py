"""``--backend openvino`` keeps each compiled shape in ENGINE_DIR/openvino/ (``sdrt/backends/openvino_blobs.py``):
a later process imports it without compiling or reading the ONNX; a damaged blob, or one made by another
OpenVINO, is compiled again; read-only or opted-out folders keep nothing; at most MAX_BLOBS shapes each."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

openvino = pytest.importorskip("openvino")

from sdrt.backends import open_engine, openvino_blobs, records  # noqa: E402
from sdrt.backends.openvino import CACHE_ENV, PRECISION_ENV  # noqa: E402
from sdrt.manifest import MANIFEST_NAME, load_manifest  # noqa: E402
from sdrt.specs import UNET  # noqa: E402


@pytest.fixture
def engines(tiny_engine_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "f32")  # the same kernels whether compiled or imported
    monkeypatch.delenv(CACHE_ENV, raising=False)
    out = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, out)
    return out


@pytest.fixture
def compiles(monkeypatch):
    """How many times OpenVINO compiled a model in this test."""
    real, count = openvino.Core.compile_model, []

    def counting(self, *args, **kwargs):
        count.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(openvino.Core, "compile_model", counting)
    return count


def _call(root, size=64, batch=2):
    manifest = load_manifest(root)
    spec = manifest.specs[UNET]
    rng = np.random.default_rng(size + batch)
    feeds = {t.name: rng.standard_normal(t.shape(batch, size, size, spec.scale)).astype(t.dtype) for t in spec.inputs}
    return open_engine(manifest, UNET, "openvino", threads=1)(feeds)[spec.output_names[0]]


def _record(root) -> dict:
    return load_manifest(root).engines(openvino_blobs.KEY)["components"][UNET]


def test_compiled_shape_is_kept_and_imported(engines, compiles, monkeypatch):
    first = _call(engines)
    record = _record(engines)
    assert record["build"] == openvino.__version__ and record["onnx_sha256"] == load_manifest(engines).onnx_digest(UNET)
    assert record["cpu"] == records.cpu_identity() and record["config"]["INFERENCE_NUM_THREADS"] == "1"
    (entry,) = record["blobs"].values()
    assert entry["inputs"]["sample"] == [2, 4, 8, 8] and entry["precision"] == "f32"
    assert [f["path"] for f in record["files"]] == [entry["path"]] and (engines / entry["path"]).is_file()
    assert len(compiles) == 1

    # the next process: the blob is imported; neither compiled nor is the 3.4 GB-class ONNX read
    monkeypatch.setattr(openvino.Core, "read_model", lambda *a, **k: pytest.fail("read the ONNX"))
    np.testing.assert_array_equal(_call(engines), first)
    assert len(compiles) == 1


def test_damaged_or_foreign_blob_is_compiled_again(engines, compiles, caplog):
    first = _call(engines)
    (entry,) = _record(engines)["blobs"].values()
    blob = engines / entry["path"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    np.testing.assert_array_equal(_call(engines), first)
    assert len(compiles) == 2 and "compiled OpenVINO blob is not used" in caplog.text
    load_manifest(engines).check_file(_record(engines)["files"][0])  # rewritten, and its record with it

    manifest = json.loads((engines / MANIFEST_NAME).read_text())  # as if written by another OpenVINO
    manifest["engines"]["openvino"]["components"][UNET]["build"] = "2020.1.0-1-abc"
    (engines / MANIFEST_NAME).write_text(json.dumps(manifest))
    np.testing.assert_array_equal(_call(engines), first)
    assert len(compiles) == 3 and _record(engines)["build"] == openvino.__version__
    assert len(list((engines / "openvino").glob("*.blob"))) == 1


@pytest.mark.parametrize("how", ["read-only", "opted out"])
def test_nothing_kept_where_not_wanted(how, engines, compiles, monkeypatch):
    if how == "read-only":  # (root ignores file modes, so the check itself is stubbed)
        monkeypatch.setattr(openvino_blobs, "writable", lambda root: False)
    else:
        monkeypatch.setenv(CACHE_ENV, "0")
    first = _call(engines)
    assert not (engines / "openvino").exists() and "openvino" not in load_manifest(engines).data.get("engines", {})
    np.testing.assert_array_equal(_call(engines), first)
    assert len(compiles) == 2


def test_oldest_shapes_are_dropped(engines, monkeypatch):
    monkeypatch.setattr(openvino_blobs, "MAX_BLOBS", 2)
    for size in (64, 72, 80):
        _call(engines, size=size, batch=1)
    blobs = _record(engines)["blobs"]
    assert sorted(e["inputs"]["sample"][2] for e in blobs.values()) == [9, 10]
    assert sorted(p.name for p in (engines / "openvino").glob("*.blob")) == sorted(
        e["path"].split("/")[-1] for e in blobs.values())
