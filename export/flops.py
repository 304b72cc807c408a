"""FLOPs of one call of an ONNX graph at fixed input shapes, counted from the graph (for ``sdrt bench``).

Counts the multiply-adds of the ops that carry the work, 2 FLOPs each, as torch's
``torch.utils.flop_counter.FlopCounterMode`` does: ``Conv``, ``ConvTranspose``, ``MatMul``, ``Gemm``
and fused attention (ONNX ``Attention``, ``com.microsoft`` ``MultiHeadAttention``: QKᵀ and AV).
Elementwise ops, normalizations and softmax are not counted (well under 1 % of a UNet). Shapes come
from ONNX shape inference with data propagation after the dynamic input axes are fixed; the weights
are never read (``load_external_data=False``), so a 3.4 GB UNet is counted in seconds. Results are
cached per graph (sha256 of the ``.onnx`` file) and input shapes under ``$XDG_CACHE_HOME/sdrt/flops``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import onnx
from onnx import shape_inference

log = logging.getLogger(__name__)

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "MultiHeadAttention")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt" / "flops"


def _fix_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shapes[value.name]):
            raise ValueError(f"{value.name}: graph has rank {len(dims)}, got shape {shapes[value.name]}")
        for dim, size in zip(dims, shapes[value.name]):
            dim.Clear()
            dim.dim_value = int(size)


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    graph = model.graph
    out = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        shape = value.type.tensor_type.shape
        out[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = list(attr.t.dims)
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def node_flops(node: onnx.NodeProto, shape) -> int | None:
    """FLOPs of one node (``shape(name)`` gives a tensor's dims or None); None when a shape is unknown."""
    op = node.op_type
    if op == "Conv":
        x, w, y = shape(node.input[0]), shape(node.input[1]), shape(node.output[0])
        if None in (x, w, y):
            return None
        return 2 * math.prod(y) * math.prod(w[1:])  # w: [C_out, C_in / group, *kernel]
    if op == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        if None in (x, w):
            return None
        return 2 * math.prod(x) * w[1] * math.prod(w[2:])  # w: [C_in, C_out / group, *kernel]
    if op == "MatMul":
        a, y = shape(node.input[0]), shape(node.output[0])
        if None in (a, y):
            return None
        return 2 * math.prod(y) * a[-1]
    if op == "Gemm":
        a, y = shape(node.input[0]), shape(node.output[0])
        if None in (a, y):
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return 2 * math.prod(y) * k
    if op in ("Attention", "MultiHeadAttention"):
        return _attention_flops(node, shape)
    return 0


def _attention_flops(node: onnx.NodeProto, shape) -> int | None:
    """QKᵀ and AV of a fused attention node (no projections: MultiHeadAttention and ONNX Attention take
    projected Q, K, V). Q [B, S, H·D] or [B, H, S, D]; K [B, L, H·D] or [B, H, L, D]; V likewise."""
    q, k, v = (shape(node.input[i]) if len(node.input) > i and node.input[i] else None for i in range(3))
    if None in (q, k, v):
        return None
    if len(q) == 4:  # [B, H, S, D]
        batch_heads, s, d = q[0] * q[1], q[2], q[3]
        length, dv = k[2], v[3]
        return 2 * batch_heads * s * length * (d + dv)
    batch, s, hd = q
    length = k[1]
    return 2 * batch * s * length * (hd + v[-1])


def count_flops(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """{"total": FLOPs, "by_op": {op: FLOPs}, "nodes": counted nodes}; raises ValueError on unknown shapes.

    At batch 1 ONNX shape inference cannot resolve the broadcasts the exporter writes for per-sample inputs
    (diffusers' ``timesteps.expand(sample.shape[0])`` becomes Expand of a [1] tensor by a runtime-built shape:
    dimension 1 broadcasts to anything, so the result stays unknown). The counted ops' FLOPs are linear in the
    batch, so a batch-1 count that fails is taken as 2 F(2) - F(3) on the dynamic leading axes."""
    try:
        return _count(model, input_shapes)
    except ValueError:
        ones = [v.name for v in model.graph.input if input_shapes.get(v.name, (0,))[:1] == (1,)
                and v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param]
        if not ones:
            raise
    two, three = ({**input_shapes, **{n: (b, *input_shapes[n][1:]) for n in ones}} for b in (2, 3))
    two, three = _count(model, two), _count(model, three)
    by_op = {op: 2 * two["by_op"][op] - three["by_op"][op] for op in two["by_op"]}
    return {"total": sum(by_op.values()), "by_op": by_op, "nodes": two["nodes"], "batch_extrapolated": True}


def _count(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _fix_inputs(model, input_shapes)
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    known = _known_shapes(inferred)

    def shape(name: str):
        dims = known.get(name)
        return None if dims is None or None in dims else dims

    by_op: dict[str, int] = {}
    nodes, unknown = 0, []
    for node in inferred.graph.node:
        if node.op_type not in COUNTED:
            continue
        flops = node_flops(node, shape)
        if flops is None:
            unknown.append(node.name or node.output[0])
            continue
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
        nodes += 1
    if unknown:
        raise ValueError(f"shape inference left {len(unknown)} counted nodes without shapes (first: {unknown[0]})")
    return {"total": sum(by_op.values()), "by_op": by_op, "nodes": nodes}


def graph_flops(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]], cache: bool = True) -> dict:
    """``count_flops`` of the ONNX file at ``path``, cached per file content and input shapes."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([digest, sorted((k, list(v)) for k, v in input_shapes.items())])
                         .encode()).hexdigest()[:24]
    entry = cache_dir() / f"{key}.json"
    if cache and entry.is_file():
        try:
            return json.loads(entry.read_text())
        except (OSError, ValueError):
            pass
    result = count_flops(onnx.load(str(path), load_external_data=False), input_shapes)
    result["graph_sha256"] = digest
    result["input_shapes"] = {k: list(v) for k, v in input_shapes.items()}
    if cache:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(result, handle)
            os.replace(tmp, entry)
        except OSError as exc:
            log.debug("cannot cache FLOP count in %s (%s)", entry.parent, exc)
    return result
