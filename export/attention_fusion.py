"""Rewrite exported attention into ONNX Runtime's fused ``com.microsoft::MultiHeadAttention`` (ort-cpu only).

diffusers' ``AttnProcessor2_0`` calls ``F.scaled_dot_product_attention``; the legacy torch exporter
writes it (UNet self/cross attention and the VAE mid-block attention alike) as::

    q (B,S,H*D) -> Reshape(B,-1,H,D) -> Transpose(0,2,1,3) -> Mul(c) --\\
    k (B,L,H*D) -> Reshape(B,-1,H,D) -> Transpose(0,2,3,1) -> Mul(c) --> MatMul -> Softmax(-1) --\\
    v (B,L,H*D) -> Reshape(B,-1,H,D) -> Transpose(0,2,1,3) --------------------------------------> MatMul
        -> Transpose(0,2,1,3) -> Reshape(B,-1,H*D)

where c = sqrt(1/sqrt(D)) is computed at run time from ``Shape(q_heads)[-1]`` (SDPA's default scale
split over q and k), or a constant when a scale was given. The reshape targets are built at run time
too (Shape -> Gather -> Concat, because batch and H*W are dynamic), which is why onnxruntime.transformers'
UNet fusion cannot read the head count; here H and D are read from the constant tail of those Concats.

``MultiHeadAttention(q, k, v, num_heads=H[, scale])`` (ContribOperators.md: query (B,S,H*D), key
(B,L,H*D), value (B,L,H*Dv), output (B,S,H*Dv), scale default 1/sqrt(D)) is exactly
softmax(Q_h K_h^T * scale) V_h per head with the heads merged back, i.e. the whole chain above.

The plain exported ONNX stays standard ONNX (TensorRT and the portable artifact use it); only the
graphs ``build-engines --backend ort-cpu`` writes are rewritten, since the contrib op ties the graph
to ONNX Runtime.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx

log = logging.getLogger(__name__)

OP, DOMAIN = "MultiHeadAttention", "com.microsoft"
SPLIT_Q_V, SPLIT_K = (0, 2, 1, 3), (0, 2, 3, 1)  # (B,S,H,D) -> (B,H,S,D); keys -> (B,H,D,L)
MERGE = (0, 2, 1, 3)  # (B,H,S,D) -> (B,S,H,D)
TRANSPARENT = ("Cast",)  # ops skipped when walking the scale subgraph (fp32 -> fp32 casts)
SMALL = 8  # constants read while matching have at most this many elements (weights are never read)


@dataclass
class Attention:
    """One matched attention: the 3-D projections in, the head-merged tensor out."""

    query: object
    key: object
    value: object
    output: object
    heads: int
    scale: float | None  # None: MultiHeadAttention's default 1/sqrt(head_dim)
    name: str


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace every matched attention chain of ``model`` by one MultiHeadAttention node; return
    (new model, number fused). Initializers stored as external data are not loaded and stay external."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(_with_shapes(model))
    matches = [m for m in (match_attention(node) for node in graph.nodes if node.op == "Softmax") if m]
    for match in matches:
        _replace(graph, match)
    if not matches:
        return model, 0
    graph.cleanup().toposort()
    fused = gs.export_onnx(graph, do_type_check=False)
    log.debug("fused %d attention block(s) into %s.%s", len(matches), DOMAIN, OP)
    return fused, len(matches)


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with inferred shapes (large exports come without value_info); the projections' static
    widths are what the head count and size are read from. External weights are not needed for this."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        log.debug("shape inference failed (%s); matching with the shapes the graph has", exc)
        return model


def match_attention(softmax) -> Attention | None:
    """The attention around ``softmax`` if it is the exported SDPA chain described at the top, else None."""
    if _attr(softmax, "axis", -1) not in (-1, 3) or len(softmax.outputs[0].outputs) != 1:
        return None
    scores, context = _producer(softmax.inputs[0], "MatMul"), softmax.outputs[0].outputs[0]
    if scores is None or context.op != "MatMul" or context.inputs[0] is not softmax.outputs[0]:
        return None
    (q_heads, q_scale), (k_heads, k_scale) = _scaled(scores.inputs[0]), _scaled(scores.inputs[1])
    query, key, value = (_head_split(q_heads, SPLIT_Q_V), _head_split(k_heads, SPLIT_K),
                         _head_split(context.inputs[1], SPLIT_Q_V))
    merged = _head_merge(context.outputs[0])
    if None in (query, key, value, merged) or len({query[1:], key[1:], value[1:]}) != 1:
        return None
    heads, head_dim = query[1:]
    if merged[1] != heads * head_dim:
        return None
    scale = _scale(q_scale, k_scale, q_heads, head_dim)
    if scale is False:
        return None
    return Attention(query[0], key[0], value[0], merged[0], heads, scale, softmax.name)


def _replace(graph, match: Attention) -> None:
    import onnx_graphsurgeon as gs

    match.output.inputs.clear()  # detach it from the head-merge Reshape; the dead chain is cleaned up
    attrs = {"num_heads": match.heads}
    if match.scale is not None:
        attrs["scale"] = float(match.scale)
    name = match.name.rsplit("/", 1)[0] + f"/{OP}" if "/" in match.name else f"{match.name}_{OP}"
    graph.nodes.append(gs.Node(op=OP, name=name, domain=DOMAIN, attrs=attrs,
                               inputs=[match.query, match.key, match.value], outputs=[match.output]))


# --- pieces of the pattern ------------------------------------------------------------------------

def _producer(tensor, op: str):
    """The node of type ``op`` that produces ``tensor``, or None."""
    node = tensor.inputs[0] if getattr(tensor, "inputs", None) else None
    return node if node is not None and node.op == op else None


def _attr(node, name: str, default=None):
    return node.attrs.get(name, default)


def _constant(tensor) -> np.ndarray | None:
    """The value of a small constant tensor (initializer or Constant node), else None."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):  # its shape is known without reading (maybe external) data
        return np.asarray(tensor.values) if int(np.prod(tensor.shape)) <= SMALL else None
    node = _producer(tensor, "Constant")
    return np.asarray(node.attrs["value"].values) if node is not None and "value" in node.attrs else None


def _scaled(tensor) -> tuple:
    """``Mul(x, c)`` (either order) -> (x, c); anything else -> (tensor, None)."""
    node = _producer(tensor, "Mul")
    if node is None:
        return tensor, None
    first, second = node.inputs
    if _is_scale_like(second):
        return first, second
    return (second, first) if _is_scale_like(first) else (tensor, None)


def _is_scale_like(tensor) -> bool:
    value = _constant(tensor)
    if value is not None:
        return value.size == 1
    return _producer(tensor, "Sqrt") is not None


def _transposes(tensor) -> tuple:
    """Walk back through consecutive Transposes: (their input, the composed permutation)."""
    perm = None
    node = _producer(tensor, "Transpose")
    while node is not None:
        inner = tuple(_attr(node, "perm"))
        perm = inner if perm is None else tuple(inner[i] for i in perm)
        tensor = node.inputs[0]
        node = _producer(tensor, "Transpose")
    return tensor, perm


def _head_split(tensor, perm: tuple) -> tuple | None:
    """``Transpose(perm)(Reshape(x, [B, -1, H, D]))`` with x rank 3 -> (x, H, D), else None."""
    source, found = _transposes(tensor)
    reshape = _producer(source, "Reshape")
    if found != perm or reshape is None or _attr(reshape, "allowzero", 0) or _rank(reshape.inputs[1]) != 4:
        return None
    tail = _shape_tail(reshape.inputs[1], 3)
    x = reshape.inputs[0]
    if tail is None or tail[0] != -1 or min(tail[1:]) <= 0 or not _rank_3_with_width(x, tail[1] * tail[2]):
        return None
    return x, int(tail[1]), int(tail[2])


def _head_merge(tensor) -> tuple | None:
    """``Reshape(Transpose(0,2,1,3)(t), [B, -1, H*D])`` of a single-use ``t`` -> (reshape output, H*D)."""
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != "Transpose":
        return None
    transpose = tensor.outputs[0]
    if tuple(_attr(transpose, "perm")) != MERGE or len(transpose.outputs[0].outputs) != 1:
        return None
    reshape = transpose.outputs[0].outputs[0]
    if reshape.op != "Reshape" or _attr(reshape, "allowzero", 0):
        return None
    tail = _shape_tail(reshape.inputs[1], 2)
    if tail is None or tail[0] != -1 or tail[1] <= 0 or _rank(reshape.inputs[1]) != 3:
        return None
    return reshape.outputs[0], int(tail[1])


def _shape_tail(tensor, count: int) -> list[int] | None:
    """The last ``count`` entries of a reshape target when they are known (see ``_ints``)."""
    values = _ints(tensor)
    if values is None or len(values) < count or None in values[-count:]:
        return None
    return values[-count:]


def _rank(shape_tensor) -> int | None:
    """Length of a 1-D reshape target (its entries may be unknown)."""
    values = _ints(shape_tensor)
    return None if values is None else len(values)


def _ints(tensor, depth: int = 12) -> list | None:
    """The entries of a small integer tensor built from constants and static dims of ``Shape`` (what
    the legacy exporter emits for ``view(b, -1, heads, inner // heads)``), None for unknown ones; None
    when not even its length is known. Scalars are one-entry lists."""
    value = _constant(tensor)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else None
    node = tensor.inputs[0] if tensor.inputs and depth else None
    if node is None:
        return None
    if node.op == "Shape":
        shape = node.inputs[0].shape
        dims = None if shape is None else [d if isinstance(d, int) else None for d in shape]
        return None if dims is None else dims[_attr(node, "start", 0):_attr(node, "end", len(dims))]
    parts = [_ints(t, depth - 1) if getattr(t, "name", "") else None for t in node.inputs]
    if node.op in ("Cast", "Unsqueeze", "Squeeze", "Identity") and parts[0] is not None:
        return parts[0]
    if node.op == "Concat" and _attr(node, "axis") == 0 and None not in parts:
        return [v for part in parts for v in part]
    if node.op == "Gather" and _attr(node, "axis", 0) == 0 and None not in parts[:2] and None not in parts[1]:
        return [parts[0][i] if -len(parts[0]) <= i < len(parts[0]) else None for i in parts[1]]
    if node.op == "Slice" and len(parts) == 3 and parts[0] is not None and parts[1] and parts[2]:
        return parts[0][parts[1][0]:parts[2][0]] if None not in (parts[1][0], parts[2][0]) else None
    if node.op in _ARITHMETIC and len(parts) == 2 and None not in parts and len(parts[1]) in (1, len(parts[0])):
        right = parts[1] * len(parts[0]) if len(parts[1]) == 1 else parts[1]
        return [None if a is None or b is None else _ARITHMETIC[node.op](a, b) for a, b in zip(parts[0], right)]
    return None


def _int_div(a: int, b: int) -> int | None:
    return int(a / b) if b else None  # ONNX integer Div truncates toward zero


_ARITHMETIC = {"Div": _int_div, "Mul": lambda a, b: a * b, "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b}


def _rank_3_with_width(tensor, width: int) -> bool:
    """Whether ``tensor`` is known to be (B, S, width); the last axis may be unknown, the rank may not."""
    shape = tensor.shape
    return shape is not None and len(shape) == 3 and (not isinstance(shape[2], int) or shape[2] == width)


def _scale(q_scale, k_scale, q_heads, head_dim: int):
    """The softmax scale: None for SDPA's default 1/sqrt(D) (also MultiHeadAttention's default), the
    product of two constant factors, or False when the factors are neither."""
    if q_scale is None and k_scale is None:
        return 1.0
    values = [_constant(t) for t in (q_scale, k_scale)]
    if all(v is not None and v.size == 1 for v in values):
        scale = float(values[0].reshape(-1)[0] * values[1].reshape(-1)[0])
        return None if math.isclose(scale, 1 / math.sqrt(head_dim), rel_tol=1e-6) else scale
    if all(_is_default_sdpa_factor(t, q_heads) for t in (q_scale, k_scale)):
        return None
    return False


def _is_default_sdpa_factor(tensor, q_heads) -> bool:
    """``Sqrt(1 / Sqrt(Shape(q_heads)[-1:]))`` (Casts skipped): the torch SDPA symbolic's default factor."""
    sqrt = _producer(_skip(tensor), "Sqrt")
    div = _producer(_skip(sqrt.inputs[0]), "Div") if sqrt is not None else None
    if div is None or not _is_one(div.inputs[0]):
        return False
    inner = _producer(_skip(div.inputs[1]), "Sqrt")
    sliced = _producer(_skip(inner.inputs[0]), "Slice") if inner is not None else None
    if sliced is None or len(sliced.inputs) < 3:
        return False
    shape = _producer(sliced.inputs[0], "Shape")
    starts = _constant(sliced.inputs[1])
    return shape is not None and shape.inputs[0] is q_heads and starts is not None and starts.reshape(-1).tolist() == [-1]


def _skip(tensor):
    node = tensor.inputs[0] if tensor.inputs else None
    while node is not None and node.op in TRANSPARENT:
        tensor = node.inputs[0]
        node = tensor.inputs[0] if tensor.inputs else None
    return tensor


def _is_one(tensor) -> bool:
    value = _constant(tensor)
    return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 1.0
