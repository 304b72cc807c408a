"""``sdrt bench --compare``: the peers smoke run on the tiny model (whichever peers are installed; the
others skipped with a reason), the UNet FLOP counter (a hand count, and torch's own counter on the tiny
UNet), the fp32 peak helper, stable-diffusion.cpp's folder view, and RESULTS.md's section handling.
No timing is checked against a bound."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sdrt import machine
from sdrt.cli import main
from sdrt_export import flops
from sdrt_export.bench_peers import PREFIX, sdcpp_view, support

TINY = ["--width", "64", "--height", "64", "--steps", "2", "--runs", "1", "--warmup", "0", "--threads", "1"]


def _small_graph() -> onnx.ModelProto:
    """Conv, grouped Conv, ConvTranspose, a MatMul behind a runtime-built Reshape, Gemm, MultiHeadAttention."""
    f = TensorProto.FLOAT
    init = [helper.make_tensor(n, f, dims, np.zeros(int(np.prod(dims)), np.float32))
            for n, dims in (("w1", [4, 3, 3, 3]), ("w2", [4, 2, 1, 1]), ("w3", [4, 2, 2, 2]), ("w4", [4, 5]),
                            ("gb", [7, 6]))]
    init += [helper.make_tensor("idx0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("tail", TensorProto.INT64, [2], [4, 64])]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y", "w2"], ["z"], group=2),
        helper.make_node("ConvTranspose", ["z", "w3"], ["up"], strides=[2, 2]),
        helper.make_node("Shape", ["z"], ["zs"]),
        helper.make_node("Gather", ["zs", "idx0"], ["b"]),
        helper.make_node("Concat", ["b", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["z", "target"], ["zr"]),
        helper.make_node("Transpose", ["zr"], ["zt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["zt", "w4"], ["mm"]),
        helper.make_node("Gemm", ["g", "gb"], ["gemm"], transB=1),
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["att"], domain="com.microsoft", num_heads=2),
    ]
    inputs = [helper.make_tensor_value_info("x", f, ["batch", 3, 8, 8]),
              helper.make_tensor_value_info("g", f, [3, 6]),
              helper.make_tensor_value_info("q", f, ["batch", 10, 8]),
              helper.make_tensor_value_info("k", f, ["batch", 12, 8]),
              helper.make_tensor_value_info("v", f, ["batch", 12, 8])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("up", "mm", "gemm", "att")]
    graph = helper.make_graph(nodes, "small", inputs, outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_flop_count_matches_a_hand_count():
    b = 2
    hand = {
        "Conv": 2 * (b * 4 * 8 * 8) * (3 * 3 * 3)  # every output element: C_in * kh * kw multiply-adds
                + 2 * (b * 4 * 8 * 8) * (2 * 1 * 1),  # grouped: C_in / group = 2 per output
        "ConvTranspose": 2 * (b * 4 * 8 * 8) * (2 * 2 * 2),  # every input element feeds C_out * kh * kw outputs
        "MatMul": 2 * (b * 64 * 5) * 4,  # [b, 64, 4] @ [4, 5]
        "Gemm": 2 * (3 * 7) * 6,  # [3, 6] @ [6, 7]
        "MultiHeadAttention": 2 * b * 10 * 12 * 8 * 2,  # QK^T and AV over all heads
    }
    counted = flops.count_flops(_small_graph(), {"x": (b, 3, 8, 8), "q": (b, 10, 8), "k": (b, 12, 8),
                                                 "v": (b, 12, 8)})
    assert counted["by_op"] == hand
    assert counted["total"] == sum(hand.values()) == 50940
    with pytest.raises(ValueError, match="rank"):
        flops.count_flops(_small_graph(), {"x": (b, 3, 8)})


@pytest.mark.parametrize("batch", [2, 1])  # 1: a guidance-0 call, whose timestep broadcast ONNX cannot infer
def test_unet_flops_equal_torch_flop_counter_and_are_cached(batch, tiny_model_dir, tiny_engine_dir, tmp_path,
                                                            monkeypatch):
    """The tiny UNet's ONNX count equals torch's FlopCounterMode on the diffusers UNet (eager attention, so
    torch counts the attention matmuls too), and the second count comes from the cache."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_model_dir) / "unet").eval()
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(batch, 4, 16, 16), torch.tensor([10] * batch),
             torch.randn(batch, 77, unet.config.cross_attention_dim))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shapes = {"sample": (batch, 4, 16, 16), "timestep": (batch,),
              "encoder_hidden_states": (batch, 77, unet.config.cross_attention_dim)}
    counted = flops.graph_flops(Path(tiny_engine_dir) / "unet.onnx", shapes)
    assert counted["total"] == counter.get_total_flops()
    assert len(list((tmp_path / "sdrt" / "flops").glob("*.json"))) == 1
    monkeypatch.setattr(flops, "count_flops", lambda *a: pytest.fail("not served from the cache"))
    assert flops.graph_flops(Path(tiny_engine_dir) / "unet.onnx", shapes) == counted


def test_fp32_peak_is_the_product_of_its_stated_factors(monkeypatch):
    monkeypatch.setenv(machine.CLOCK_ENV, "3.0")
    cpu = machine.cpu_info()
    p = cpu["peak"]
    assert p["ghz"] == 3.0 and p["clock_source"] == f"${machine.CLOCK_ENV}"
    assert p["fp32_gflops"] == pytest.approx(p["cores"] * p["fma_pipes"] * p["lanes"] * 2 * 3.0)
    assert p["cores"] == cpu["physical_cores"] >= 1 and p["lanes"] in (4, 8, 16)
    one = machine.cpu_info(threads=1)["peak"]
    assert one["cores"] == 1 and one["fp32_gflops"] == pytest.approx(p["fp32_gflops"] / p["cores"])
    line = machine.peak_line(cpu)
    assert f"{p['fma_pipes']} FMA pipes" in line and "3.00 GHz" in line
    assert cpu["model"] in machine.describe(cpu) and "load average" in machine.describe(cpu)


def test_sdcpp_folder_view_prefixes_the_text_encoder_keys(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file

    view = sdcpp_view(tiny_model_dir, tmp_path / "view")
    src = Path(tiny_model_dir)
    original = load_file(str(src / "text_encoder" / "model.safetensors"))
    rewritten = load_file(str(view / "text_encoder" / "model.safetensors"))
    assert not any(k.startswith(PREFIX) for k in original)  # what transformers 5 writes
    assert set(rewritten) == {PREFIX + k for k in original}
    assert all(np.array_equal(rewritten[PREFIX + k], v) for k, v in original.items())
    unet = view / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.is_symlink() and unet.resolve() == (src / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    assert (view / "model_index.json").is_symlink() and not (view / "text_encoder" / "model.safetensors").is_symlink()
    again = sdcpp_view(view, tmp_path / "view2")  # keys already prefixed stay as they are
    assert set(load_file(str(again / "text_encoder" / "model.safetensors"))) == set(rewritten)


def test_sdcpp_support_names_what_it_cannot_run(tiny_model_dir, tmp_path):
    assert "released SD architectures" in support(tiny_model_dir)
    for sub, config in (("unet", {"block_out_channels": [320, 640, 1280, 1280]}),
                        ("text_encoder", {"hidden_size": 768})):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))
    assert support(tmp_path) is None


def test_bench_compare_runs_the_installed_peers_and_skips_the_others(tiny_engine_dir, tiny_model_dir, tmp_path,
                                                                     capsys):
    out, engines = tmp_path / "compare.json", tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, engines)  # the openvino peer keeps its compiled shapes in ENGINE_DIR
    code = main(["bench", "--engines", str(engines), *TINY, "--compare", "diffusers,openvino,sdcpp",
                 "--model", str(tiny_model_dir), "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    expected = ["sdrt", "diffusers"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    assert list(report["systems"]) == expected
    assert set(report["skipped"]) == {"sdcpp"} | ({"openvino"} - set(expected))
    assert all(report["skipped"].values())  # each with its reason
    assert f"skipped sdcpp: {report['skipped']['sdcpp']}" in text and "fp32 peak" in text
    (point,) = report["points"]
    work = point["unet_work"]
    assert work["unet_batch"] == 2 and work["flops"] == flops.graph_flops(
        Path(tiny_engine_dir) / "unet.onnx", {"sample": (2, 4, 8, 8), "timestep": (2,),
                                              "encoder_hidden_states": (2, 77, 32)})["total"]
    for name in expected:
        stages = point["systems"][name]
        for stage in ("text_encoder", "unet_call", "vae_decode", "end_to_end"):
            assert 0 <= stages[stage]["min"] <= stages[stage]["p50"] <= stages[stage]["p99"], (name, stage)
        gflops = point["unet_gflops"][name]
        assert gflops["gflops"] == pytest.approx(work["flops"] / stages["unet_call"]["p50"] / 1e9)
        assert gflops["peak_share"] > 0 and report["systems"][name]["precision"]
    assert set(point["ratios_by_system"]) == set(expected) - {"sdrt"}
    assert report["machine"]["cpu_info"]["peak"]["cores"] == 1  # --threads 1


def test_one_resident_never_holds_two_systems(tiny_engine_dir, tiny_model_dir, tmp_path, monkeypatch):
    """``--one-resident``: a fresh worker per system and round, closed before the next one starts; every
    round is a cold start and gives one timed run per system."""
    from sdrt import bench_runs

    alive, events = set(), []

    class Tracked(bench_runs.Worker):
        def __init__(self, name, *args):
            assert not alive, f"{name} started while {alive} still ran"
            super().__init__(name, *args)
            alive.add(name)
            events.append(name)

        def close(self):
            alive.discard(self.name)
            super().close()

    monkeypatch.setattr(bench_runs, "Worker", Tracked)
    out = tmp_path / "one.json"
    args = TINY[:]
    args[args.index("--runs") + 1], args[args.index("--warmup") + 1] = "2", "1"
    assert main(["bench", "--engines", str(tiny_engine_dir), *args, "--one-resident",
                 "--compare", "diffusers", "--model", str(tiny_model_dir), "--json", str(out)]) == 0
    assert events == ["sdrt", "diffusers", "sdrt", "diffusers"] and not alive
    report = json.loads(out.read_text())
    assert report["config"]["one_resident"] is True
    for name in ("sdrt", "diffusers"):
        cold = report["systems"][name]["cold_start"]
        assert len(cold["rounds_total_s"]) == 2 and cold["total_s"] == cold["rounds_total_s"][0]
        assert report["points"][0]["systems"][name]["end_to_end"]["n"] == 2  # one timed run per round
    text = _render_module().render_compare([(report, "one.json")], "sdxl", "SDXL-shaped")
    assert text.startswith("## SDXL-shaped (generated)") and "--section sdxl" in text
    assert "one system resident at a time" in text and "| sdrt / diffusers |" in text


def test_bench_compare_unknown_peer_exits_2(tiny_engine_dir, capsys):
    assert main(["bench", "--engines", str(tiny_engine_dir), "--compare", "diffusers,torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert "torchscript" in err and "\n" not in err


def _render_module():
    spec = importlib.util.spec_from_file_location("render_results", Path(__file__).parents[1] / "benchmarks" /
                                                  "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_results_keeps_the_sections_other_scripts_wrote(tmp_path):
    render = _render_module()
    path = tmp_path / "RESULTS.md"
    path.write_text("# old body\n\n<!-- capi_overhead.py: begin -->\nC ABI\n<!-- capi_overhead.py: end -->\n\n"
                    "<!-- serve_throughput:begin -->\nRay\n<!-- serve_throughput:end -->\n")
    render.write_body(path, "# new body\n")
    text = path.read_text()
    assert text.startswith("# new body\n") and "old body" not in text
    assert "C ABI\n<!-- capi_overhead.py: end -->" in text and "Ray\n<!-- serve_throughput:end -->" in text
    render.write_section(path, "bench_compare", "peers v1")
    render.write_section(path, "bench_compare", "peers v2")
    text = path.read_text()
    assert text.count("<!-- bench_compare: begin -->") == 1 and "peers v2" in text and "peers v1" not in text
    assert text.startswith("# new body\n") and "C ABI" in text and "Ray" in text
