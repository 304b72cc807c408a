"""Mixed-precision fp16 ONNX for strongly typed TensorRT: fp16 everywhere except fp32 islands.

TensorRT 11 builds only strongly typed networks, so an engine computes in exactly the types its ONNX
graph declares. ``convert`` turns a cleaned fp32 graph into such a graph: ONNX Runtime's float16
converter (``onnxruntime.transformers.float16``) with ``keep_io_types=True`` (I/O stays float32, as
the component specs say) and a node block list computed from the island policy below, then an
ONNX-GraphSurgeon pass that removes the fp32 -> fp16 -> fp32 Cast round trips the converter leaves
between adjacent fp32 nodes (without it an island would still round its activations to fp16).

The island policy is plain data (``ISLANDS``); what each island matched is recorded in the manifest.
``emulate`` rewrites an fp16 graph to compute in fp32 and round every fp16 tensor to fp16, which is
what a strongly typed engine does (fp32 accumulation, fp16 storage). ONNX Runtime on the CPU runs
fp16 graphs through fp32 kernels and drops the fp16 round trips between them, so it hides overflows;
the export check and the tests evaluate the emulated graph instead.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sdrt.specs import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from sdrt_export import graph as graph_io
from sdrt_export.checks import ort_session
from sdrt_export.wrappers import read_json

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
FP16_TOLERANCE = 1e-2  # relative L2 error of an fp16 component vs the fp32 torch module


@dataclass(frozen=True)
class Island:
    """Nodes kept in fp32: op type in ``ops`` (any if empty) and name matching ``pattern`` (any if
    empty), plus their producers of an op type in ``producers``, followed upstream."""

    name: str
    reason: str
    ops: tuple[str, ...] = ()
    pattern: str = ""
    producers: tuple[str, ...] = ()

    def matches(self, node: onnx.NodeProto) -> bool:
        return (not self.ops or node.op_type in self.ops) and \
            (not self.pattern or bool(re.search(self.pattern, node.name)))

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "ops": list(self.ops), "pattern": self.pattern,
                "producers": list(self.producers)}


NORMS = Island(
    "norm-reductions",
    "LayerNorm/GroupNorm mean and variance reductions (sums of x^2 overflow fp16; TensorRT warns about "
    "fp16 normalization); GroupNorm exports as InstanceNormalization, LayerNorm below opset 17 as ReduceMean/Pow",
    ops=("LayerNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean", "Pow"),
)
SOFTMAX = Island(
    "attention-softmax",
    "attention softmax with its scale and mask (the mask holds float32 min); transformers' CLIP and "
    "diffusers' upcast_softmax also take it in fp32",
    ops=("Softmax",), producers=("Add", "Mul", "Div"),
)
SCORES = Island(
    "attention-scores",
    "Q.K^T feeding the softmax, for UNets configured with upcast_attention (SD2.x: scores overflow fp16)",
    ops=("Softmax",), producers=("Add", "Mul", "Div", "MatMul"),
)
TIMESTEP = Island(
    "timestep-embedding",
    "timestep (and SDXL time id) * frequencies and sin/cos: arguments reach 1000 rad, where fp16 spacing is 0.5",
    pattern=r"/(add_)?time_proj/", producers=("Expand", "Unsqueeze", "Reshape", "Cast"),
)
VAE_UP = Island(
    "vae-decoder-up-blocks",
    "VAE decoder after the mid-block (up-blocks, final GroupNorm, conv_out): activations there exceed "
    "65504 in real VAEs; the split older diffusers' upcast_vae used (post_quant_conv, conv_in, mid-block in fp16)",
    pattern=r"(^|/)decoder/(up_blocks|conv_norm_out|conv_act|conv_out)\b",
)
ISLANDS: dict[str, tuple[Island, ...]] = {
    TEXT_ENCODER: (NORMS, SOFTMAX),
    UNET: (TIMESTEP, NORMS, SOFTMAX),
    VAE_DECODER: (VAE_UP, NORMS, SOFTMAX),
    VAE_ENCODER: (NORMS, SOFTMAX),
}


def islands_for(component: str, model_dir: Path | None = None) -> tuple[Island, ...]:
    """The island policy of one component (a component not in ``ISLANDS``, e.g. a second text encoder,
    gets the transformer policy); SCORES replaces SOFTMAX for a UNet with upcast_attention."""
    islands = ISLANDS.get(component, ISLANDS[TEXT_ENCODER])
    if component == UNET and model_dir is not None \
            and read_json(Path(model_dir) / "unet" / "config.json").get("upcast_attention"):
        islands = tuple(SCORES if island is SOFTMAX else island for island in islands)
    return islands


def select(model: onnx.ModelProto, islands) -> dict[str, list[str]]:
    """Names of the nodes each island keeps in fp32 (a node belongs to the first island that takes it)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    taken: set[str] = set()
    chosen = {}
    for island in islands:
        stack = [n for n in model.graph.node if island.matches(n) and n.name not in taken]
        names = []
        while stack:
            node = stack.pop()
            if node.name in taken:
                continue
            taken.add(node.name)
            names.append(node.name)
            stack += [producer[i] for i in node.input
                      if i in producer and producer[i].op_type in island.producers and producer[i].name not in taken]
        chosen[island.name] = names
    return chosen


def to_fp16(model: onnx.ModelProto, blocked: list[str]) -> onnx.ModelProto:
    """ORT's converter (every op converted unless its node is ``blocked``), then the Cast clean-up."""
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if len(set(blocked)) != len(blocked) or any(not name for name in blocked):
        raise ValueError("fp32 islands need uniquely named nodes")
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True, op_block_list=[],
                                     node_block_list=blocked)
    _drop_duplicate_casts(model)
    graph = gs.import_onnx(model)
    _fold_round_trips(graph)
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)


def convert(src: Path, dst: Path, islands) -> tuple[list[str], dict]:
    """Convert the cleaned fp32 graph ``src`` to ``dst``; return the written file names and the
    manifest record (islands applied with their node counts, dtype counts)."""
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=True)
    chosen = select(model, islands)
    model = to_fp16(model, [name for names in chosen.values() for name in names])
    record = {"fp32_islands": [{**island.to_dict(), "nodes": len(chosen[island.name])}
                               for island in islands if chosen[island.name]],
              **dtype_counts(model)}
    log.info("%s: fp16 conversion in %.1f s, fp32 islands %s", dst.stem, time.perf_counter() - start,
             {island["name"]: island["nodes"] for island in record["fp32_islands"]})
    external = graph_io.initializer_bytes(model) > graph_io.EXTERNAL_DATA_THRESHOLD
    return graph_io.save(model, dst, external=external), record


def dtype_counts(model: onnx.ModelProto) -> dict:
    """Float initializers by dtype (tensors, and weights = elements) and Cast nodes, for the manifest."""
    counts, size = Counter(), Counter()
    for tensor in model.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            name = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
            counts[name] += 1
            size[name] += int(np.prod(tensor.dims, dtype=np.int64))
    return {"initializers": dict(counts), "weights": dict(size),
            "casts": sum(node.op_type == "Cast" for node in model.graph.node)}


def _drop_duplicate_casts(model: onnx.ModelProto) -> None:
    """The converter emits one identical Cast per fp32 reader of an fp16 tensor; keep the first."""
    seen, keep = set(), []
    for node in model.graph.node:
        if node.op_type == "Cast" and tuple(node.output) in seen:
            continue
        seen.add(tuple(node.output))
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _fold_round_trips(graph) -> None:
    """Drop Cast(fp32 -> fp16) -> Cast(-> fp32) pairs, then Casts to the type they already have."""
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for node in list(graph.nodes):
        if node.op != "Cast" or node.attrs.get("to") != fp32:
            continue
        source = node.inputs[0]
        first = source.inputs[0] if source.inputs else None
        if first is not None and first.op == "Cast" and first.attrs.get("to") == fp16 \
                and first.inputs[0].dtype == np.float32:
            node.inputs[0] = first.inputs[0]
    graph.cleanup()  # the first Casts of folded pairs are dead now
    outputs = {tensor.name for tensor in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Cast" or node.inputs[0].dtype is None \
                or onnx.helper.np_dtype_to_tensor_dtype(np.dtype(node.inputs[0].dtype)) != node.attrs.get("to"):
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if dst.name in outputs:  # keep the graph output's name: its producer writes it directly
            if not src.inputs or src.name in outputs | {tensor.name for tensor in graph.inputs}:
                continue
            for consumer in [c for c in src.outputs if c is not node]:
                consumer.inputs[consumer.inputs.index(src)] = dst
            producer = src.inputs[0]
            producer.outputs[producer.outputs.index(src)] = dst
        else:
            for consumer in list(dst.outputs):
                consumer.inputs[consumer.inputs.index(dst)] = src
        node.inputs.clear()
        node.outputs.clear()


def emulate(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in fp32 with every fp16 tensor rounded through a Cast pair (fp32
    accumulation, fp16 storage: what a strongly typed fp16 engine computes), runnable on ORT CPU."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import infer_shapes
    from polygraphy.logger import G_LOGGER

    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        graph = gs.import_onnx(infer_shapes(model, error_ok=True, allow_onnxruntime=False))
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float16:
            tensor.values = tensor.values.astype(np.float32)
    for node in list(graph.nodes):
        if node.op == "Cast" and node.attrs.get("to") == fp16:
            node.attrs["to"] = fp32
        for key, value in node.attrs.items():
            if isinstance(value, gs.Constant) and value.values.dtype == np.float16:
                node.attrs[key] = gs.Constant(value.name, value.values.astype(np.float32))
        for index, out in enumerate(node.outputs):
            if out.dtype != np.float16:
                continue
            wide, half = gs.Variable(f"{out.name}/wide", np.float32), gs.Variable(f"{out.name}/half", np.float16)
            node.outputs[index] = wide
            graph.nodes.append(gs.Node("Cast", inputs=[wide], outputs=[half], attrs={"to": fp16}))
            graph.nodes.append(gs.Node("Cast", inputs=[half], outputs=[out], attrs={"to": fp32}))
            out.dtype = np.float32
    graph.toposort()
    return gs.export_onnx(graph, do_type_check=False)


def emulated_session(path: Path, scratch: Path):
    """ONNX Runtime (CPU) session on ``emulate`` of the fp16 graph at ``path``; files go to ``scratch``."""
    model = emulate(onnx.load(str(path), load_external_data=True))
    files = graph_io.save(model, scratch / "emulated.onnx",
                          external=graph_io.initializer_bytes(model) > graph_io.EXTERNAL_DATA_THRESHOLD)
    return ort_session(scratch / files[0])
