"""Where an ONNX file keeps each initializer's bytes, read without the ``onnx`` package (torch/onnx-free runtime).

An ONNX model is a protobuf ``ModelProto``; its ``graph`` (field 7) lists ``initializer`` TensorProtos (field 5)
with ``dims`` (1), ``data_type`` (2), ``name`` (8), ``raw_data`` (9), ``external_data`` (13) and
``data_location`` (14), as in onnx/onnx.proto. This walks the protobuf wire format over a memory map and
returns, per initializer stored as raw bytes (inline or in an external data file), the file, byte offset,
dtype and shape, so the weights can be memory-mapped with numpy. The exporter writes these locations into
the weight map (``sdrt.lora``); the runtime reads base weights through them.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# onnx.TensorProto.DataType -> numpy dtype (the float types LoRA touches, and the common integer ones)
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
          11: "float64"}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class Location:
    file: str  # relative to the ONNX file's folder
    offset: int
    nbytes: int
    dtype: str
    shape: tuple

    def read(self, folder: Path) -> np.ndarray:
        """The initializer as a read-only array memory-mapped from its file."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(folder / self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (begin, end) of a length-delimited field) for one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield field, wire, (pos, pos + size)
            pos += size
        elif wire == 1:
            yield field, wire, (pos, pos + 8)
            pos += 8
        elif wire == 5:
            yield field, wire, (pos, pos + 4)
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")


def _tensor(buf, begin: int, end: int, onnx_name: str) -> tuple[str, Location | None]:
    dims, dtype, name, raw, external, location = [], 0, "", None, {}, 0
    for field, wire, value in _fields(buf, begin, end):
        if field == 1 and wire == 0:
            dims.append(value)
        elif field == 1 and wire == 2:  # packed dims
            pos = value[0]
            while pos < value[1]:
                dim, pos = _varint(buf, pos)
                dims.append(dim)
        elif field == 2:
            dtype = value
        elif field == 8:
            name = bytes(buf[value[0]:value[1]]).decode()
        elif field == 9:
            raw = value
        elif field == 13:
            entry = dict((f, bytes(buf[v[0]:v[1]]).decode()) for f, _, v in _fields(buf, *value))
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == 14:
            location = value
    if dtype not in DTYPES:
        return name, None
    shape = tuple(int(d) for d in dims)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
    if location == EXTERNAL:
        if int(external.get("length", nbytes)) != nbytes:
            return name, None
        return name, Location(external["location"], int(external.get("offset", 0)), nbytes, DTYPES[dtype], shape)
    if raw is None or raw[1] - raw[0] != nbytes:  # typed fields (float_data, ...) are not memory-mappable
        return name, None
    return name, Location(onnx_name, raw[0], nbytes, DTYPES[dtype], shape)


def initializer_locations(path: str | Path) -> dict[str, Location]:
    """Initializer name -> ``Location`` for every initializer of ``path`` held as raw bytes."""
    path = Path(path)
    out: dict[str, Location] = {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wire, value in _fields(buf, 0, len(buf)):
            if field != 7 or wire != 2:
                continue
            for gfield, gwire, gvalue in _fields(buf, *value):
                if gfield == 5 and gwire == 2:
                    name, location = _tensor(buf, *gvalue, path.name)
                    if location is not None:
                        out[name] = location
    return out
