"""Experiment for NOTES.md: fuse the UNet's attention into ONNX Runtime's CPU MultiHeadAttention kernel.

    python benchmarks/probe_attention_fusion.py ENGINE_DIR OUT_DIR

Writes OUT_DIR/unet.onnx (+ unet.onnx.data) rewritten by onnxruntime.transformers' UNet optimizer with
only CPU-supported fusions on (attention, LayerNorm/SkipLayerNorm; no GroupNorm/BiasSplitGelu/NHWC,
which are CUDA-only), prints the op census before and after, then compare with
``probe_ort.py OUT_DIR --levers baseline``. Needs the export extra (onnx); a graph-level change like
this belongs in the exporter, not the runtime.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()

    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_nhwc_conv",
                 "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        setattr(options, flag, False)
    model = optimize_model(str(args.engine_dir / "unet.onnx"), model_type="unet", opt_level=0,
                           optimization_options=options, use_gpu=False)
    census = collections.Counter(n.op_type for n in model.model.graph.node)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(str(args.out_dir / "unet.onnx"), use_external_data_format=True,
                             all_tensors_to_one_file=True)
    for name in ("manifest.json",):
        shutil.copy(args.engine_dir / name, args.out_dir / name)
    before = collections.Counter(n.op_type for n in onnx.load(str(args.engine_dir / "unet.onnx"),
                                                             load_external_data=False).graph.node)
    print(json.dumps({"before": dict(before.most_common(12)), "after": dict(census.most_common(12))}))


if __name__ == "__main__":
    main()
