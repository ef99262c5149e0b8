"""The tflite (LiteRT) family: fp32/fp16/int8 bundles, the PT2E int8 recipe and the ops it leaves float,
and the LiteRT runner (int8 I/O, XNNPACK placement, the numpy ABI check)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_helpers import DATA, DIM, H, W, _fake_tool
from export_helpers import TABLE, TABLE_FP32_BYTES, _export, _export_int8
from torch import nn

from edge_msd.bench import runtimes
from edge_msd.families import family
from edge_msd.families.common.quantizer import cosine_to
from edge_msd.families.tflite import run_tflite
from edge_msd.quant.recipes import quantizer_for


@pytest.mark.slow
def test_tflite_fp32_bundle_parity(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "tflite")
    assert m["parity"]["passed"] and m["parity"]["text"]["min_cos"] > 0.999
    # the L2 norm's POW is an op XNNPACK leaves to the interpreter: the export says so
    check = m["delegate_check"]
    assert check["delegate"] == "XNNPACK" and check["image"]["not_delegated"].get("POW") == 1
    assert 0 < sum(check["image"]["not_delegated"].values()) < check["image"]["ops"]
    assert m["models"]["text"]["inputs"][0]["dtype"] == "int32"
    # images enter NHWC, LiteRT's own layout (parity fed them NCHW through the runner)
    image_in = m["models"]["image"]["inputs"][0]
    assert image_in["layout"] == "NHWC" and image_in["shape"][1:] == [32, 32, 3], image_in


@pytest.mark.slow
def test_tflite_fp16_parity(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "tflite", "fp16")
    assert m["parity"]["passed"], m["parity"]


@pytest.mark.slow
def test_tflite_int8_bundle_from_quant_recipe(tmp_path, student_dir, calibration):
    """int8 I/O is described (dtype, scale, zero point), parity is against the float student, and the
    calibration set and recipe are recorded; the benchmark quantizes its inputs by the same numbers."""
    from edge_msd.bench.options import BenchOptions
    from edge_msd.bench.run import run_bench
    from edge_msd.export.bundle import verify_bundle
    from edge_msd.quant.calibration import load_calibration_set

    m = _export_int8(tmp_path, student_dir, "tflite", calibration)
    image = m["models"]["image"]
    name = image["inputs"][0]["name"]
    assert image["precision"] == "int8" and image["inputs"][0]["dtype"] == "int8"
    scale, zero = image["quantization"][name]["scale"], image["quantization"][name]["zero_point"]
    assert scale > 0 and -128 <= zero < 128
    assert m["models"]["text"]["inputs"][0]["dtype"] == "int32"
    assert m["parity"]["passed"] and m["parity"]["thresholds"] == {"min_cos": 0.90, "max_delta_r1": 10.0}
    text = tmp_path / "tflite" / m["models"]["text"]["file"]
    from ai_edge_litert.interpreter import Interpreter

    tables = [d for d in Interpreter(model_path=str(text)).get_tensor_details() if list(d["shape"]) == TABLE]
    assert [np.dtype(d["dtype"]) for d in tables] == [np.int8]  # the token embedding, gathered as int8
    assert text.stat().st_size * 3 < TABLE_FP32_BYTES
    assert m["calibration"]["sha256"] == load_calibration_set(calibration).sha256
    q = m["quantization"]
    assert q["method"] == "ptq" and q["recipe"]["name"] == "tflite-int8-pt2e" and q["artifact"] is None
    assert q["towers"]["image"]["quantization"] == "full-integer" and q["towers"]["image"]["quantized_layers"]
    verify_bundle(tmp_path / "tflite")
    report = run_bench(BenchOptions(bundle=str(tmp_path / "tflite"), iters=2, warmup=0, pool=1,
                                    out=str(tmp_path / "r.json")))
    assert report["runtime"]["name"] == "litert" and report["bundle"]["quantization"] == "ptq"
    assert report["bundle"]["calibration"] == m["calibration"]["name"]
    assert report["parity"]["image"]["min_cos"] > 0.9  # the device path (int8 in/out) matches torch
    assert report["parity"]["image"]["min_cos"] == pytest.approx(m["parity"]["image"]["min_cos"], abs=1e-4)
    assert 0 <= report["recall"]["eval"]["mean_R@1"] <= 100


@pytest.mark.slow
def test_tflite_pt2e_int8_runs_in_litert_close_to_float(towers, batches, tmp_path):
    quantizer = quantizer_for(family("tflite").recipe)
    for tower, data, name in ((towers[0], batches[0], "image"), (towers[1], batches[1], "text")):
        prepared = quantizer.quantize(tower, data)
        assert quantizer.layers(prepared)
        path = tmp_path / f"{name}.tflite"
        entry = quantizer.write(prepared, data[0][:1], path)
        assert entry["quantization"] == "full-integer"
        if name == "image":  # full integer: the image enters as int8 with its scale / zero point
            assert entry["inputs"][0]["dtype"] == "int8" and entry["inputs"][0]["quantization"]["scale"] > 0
        out = run_tflite(path, data[1].numpy())
        ref = tower(data[1]).detach()
        assert cosine_to(ref, torch.from_numpy(out)) > 0.98
        sim = quantizer.simulate(prepared)(data[1]).detach()  # the converted torch graph predicts LiteRT
        assert cosine_to(sim, torch.from_numpy(out)) > 0.995


@pytest.mark.slow
def test_tflite_qat_folds_batchnorm_into_int8_convs(batches, tmp_path):
    """A conv+BN tower (the mobile-CNN students): QAT trains conv weights with BN folded in, and the
    LiteRT model holds int8 convs with no float BatchNorm arithmetic left between them."""
    from ai_edge_litert.interpreter import Interpreter

    torch.manual_seed(0)
    tower = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))
    for m in tower.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tower.eval()
    quantizer = quantizer_for(family("tflite").recipe)
    prepared = quantizer.quantize(tower, batches[0], qat=True)
    assert not any("batch_norm" in str(n.target) for n in prepared.graph.nodes)
    ref = tower(batches[0][1]).detach()
    assert cosine_to(ref, prepared(batches[0][1]).detach()) > 0.99  # fake-quant with folded BN ≈ float
    path = tmp_path / "cnn.tflite"
    quantizer.write(prepared, batches[0][0][:1], path)
    ops = [d["op_name"] for d in Interpreter(model_path=str(path))._get_ops_details()]
    assert ops.count("CONV_2D") == 2 and "MUL" not in ops and "SUB" not in ops, ops
    assert cosine_to(ref, torch.from_numpy(run_tflite(path, batches[0][1].numpy()))) > 0.98


class _ResidualCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block, pooling, projection and the L2 norm: the ops of edge-s."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block(x) + x
        return nn.functional.normalize(self.proj(x.mean(dim=(2, 3))), dim=-1)


def _float_ops(path: Path) -> list[str]:
    """Op names of a .tflite whose first input tensor is float32, sorted."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    return sorted(o["op_name"] for o in ops if o["inputs"].size and dtypes[o["inputs"][0]] == np.float32)


@pytest.mark.slow
def test_tflite_residual_adds_run_in_int8(batches, tmp_path):
    """The residual add is int8 in the LiteRT model: the only float ops left are the one DEQUANTIZE
    after the int8 projection and the L2 norm (XNNPACK has no int8 reduction or divide for it)."""
    torch.manual_seed(0)
    tower = _ResidualCNN().eval()
    quantizer = quantizer_for(family("tflite").recipe)
    path = tmp_path / "res.tflite"
    quantizer.write(quantizer.quantize(tower, batches[0]), batches[0][0][:1], path)
    assert _float_ops(path) == ["DIV", "MAXIMUM", "MUL", "POW", "SUM"]
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    details = interp._get_ops_details()
    ops = [d["op_name"] for d in details]
    assert ops.count("ADD") == 1 and ops.count("DEQUANTIZE") == 1 and "QUANTIZE" not in ops, ops
    # the int8 image enters NHWC: the first conv reads it without a TRANSPOSE of the input
    image = interp.get_input_details()[0]
    assert list(image["shape"]) == [1, 32, 32, 3]
    assert not [d for d in details if d["op_name"] == "TRANSPOSE" and image["index"] in d["inputs"]]
    out = torch.from_numpy(run_tflite(path, batches[0][1].numpy()))
    assert cosine_to(tower(batches[0][1]).detach(), out) > 0.98


def _ops_by_input_dtype(path: Path) -> dict[str, dict[str, int]]:
    """{"float32"/"int8"/…: {op name: count}} by the dtype of each op's first input."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    dtypes = {d["index"]: np.dtype(d["dtype"]).name for d in interp.get_tensor_details()}
    out: dict[str, Counter] = {}
    for o in interp._get_ops_details():
        if o["inputs"].size:
            out.setdefault(dtypes[o["inputs"][0]], Counter())[o["op_name"]] += 1
    return {k: dict(v) for k, v in out.items()}


@pytest.mark.slow
def test_tflite_text_tower_muls_stay_float_beside_float_ops(towers, batches, tmp_path):
    """The text tower's muls stay float: the attention's query scale (the attention matmuls and softmax
    are float) and the pooling's one-hot weights of the token ids (the projection and L2 norm are float).
    In int8 each was a MUL wrapped in its own QUANTIZE/DEQUANTIZE ops; the int8 ops are the linears, the
    residual and positional adds and the GELU, and the outputs match the simulated int8 graph."""
    quantizer = quantizer_for(family("tflite").recipe)
    prepared = quantizer.quantize(towers[1], batches[1])
    path = tmp_path / "text.tflite"
    quantizer.write(prepared, batches[1][0][:1], path)
    ops = _ops_by_input_dtype(path)
    # int8: 4 linears, 3 adds (2 residual, token + position); GELU (XNNPACK leaves it to the interpreter);
    # the DEQUANTIZEs before each LayerNorm, q, k, v and the pooling; CAST of the int8 embedding rows
    assert ops["int8"] == {"FULLY_CONNECTED": 4, "ADD": 3, "GELU": 1, "DEQUANTIZE": 6, "CAST": 1,
                           "RESHAPE": 6, "SLICE": 3, "TRANSPOSE": 3}, ops["int8"]
    # float, none of which XNNPACK takes in int8: 3 LayerNorms (2 MEAN, SQUARED_DIFFERENCE, ADD, RSQRT, SUB,
    # 2 MUL, ADD each; the untrained unit scale and zero shift fold away), the attention (2 BATCH_MATMUL,
    # the causal mask's ADD, SOFTMAX, the query scale's 2 MULs), the pooling (EQUAL, CUMSUM, 2 MUL, SUM),
    # the text projection (FULLY_CONNECTED by a parameter matrix), the L2 norm (MUL, SUM, POW, MAXIMUM,
    # DIV), the int8 table rows times their scales (MUL); QUANTIZE into the int8 linears and adds
    assert ops["float32"] == {"MEAN": 6, "SQUARED_DIFFERENCE": 3, "RSQRT": 3, "SUB": 3, "ADD": 7, "MUL": 12,
                              "BATCH_MATMUL": 2, "SOFTMAX": 1, "EQUAL": 1, "CUMSUM": 1, "SUM": 2,
                              "FULLY_CONNECTED": 1, "POW": 1, "MAXIMUM": 1, "DIV": 1, "QUANTIZE": 4,
                              "RESHAPE": 16, "TRANSPOSE": 3}, ops["float32"]
    out = run_tflite(path, batches[1][1].numpy())
    sim = quantizer.simulate(prepared)(batches[1][1]).detach()
    assert cosine_to(sim, torch.from_numpy(out)) > 0.995
    assert cosine_to(towers[1](batches[1][1]).detach(), torch.from_numpy(out)) > 0.98


@pytest.mark.slow
def test_float_tflite_export_keeps_the_causal_mask_and_masks_stay_float(towers, batches, tmp_path):
    """litert-torch rewrites a module's -inf buffers to -3.4e38 in place: the fp32 exporter converts a
    copy, so a tower quantized later in the same process still has its -inf mask. Masks made of the
    dtype's extreme (``finfo.min``, as many text towers build them) keep their add float too."""
    from edge_msd.families.common.pt2e import finite_inputs
    from edge_msd.families.tflite import convert_float

    text = towers[1]
    convert_float(text, batches[1][0][:1].numpy(), "fp32", tmp_path / "text.tflite")
    assert torch.isneginf(text.attn_mask).any()

    class Masked(nn.Module):
        def __init__(self, fill: float):
            super().__init__()
            self.register_buffer("mask", torch.triu(torch.full((4, 4), fill), 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mask

    for fill, int8_add in ((float("-inf"), False), (torch.finfo(torch.float32).min, False), (-1e4, True)):
        gm = torch.export.export(Masked(fill), (torch.randn(4, 4),)).module()
        add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
        assert finite_inputs(add) is int8_add, fill


@pytest.mark.slow
def test_tflite_dynamic_range_fallback_converts_and_runs(towers, batches, tmp_path):
    quantizer = quantizer_for(family("tflite").recipe)
    dyn = quantizer.quantize_dynamic(towers[0], batches[0])
    entry = quantizer.write(dyn, batches[0][0][:1], tmp_path / "image.tflite")
    assert entry["quantization"] == "dynamic-range" and entry["inputs"][0]["dtype"] == "float32"
    out = run_tflite(tmp_path / "image.tflite", batches[0][1].numpy())
    assert cosine_to(towers[0](batches[0][1]).detach(), torch.from_numpy(out)) > 0.98


@pytest.mark.slow
def test_litert_session_fp32_and_int8_io(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    if runtimes.LiteRtBackend.unavailable_reason():
        pytest.skip(runtimes.LiteRtBackend.unavailable_reason())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * H * W, DIM)).eval()
    x = torch.randn(2, 3, H, W)
    litert_torch.convert(model, (x,)).export(str(tmp_path / "m.tflite"))
    s = runtimes.LiteRtBackend().load({}, tmp_path / "m.tflite", 1, 2, {"xnnpack": True})
    y = s.run(s.prepare(x.numpy()))
    np.testing.assert_allclose(y, model(x).detach().numpy(), atol=1e-5)
    assert s.describe()["xnnpack"] is True
    p = s.placement(None, 0)  # Flatten + Linear: XNNPACK takes every op
    assert p["available"] and p["accelerator"] == "XNNPACK" and p["on_accelerator"] == p["ops"] > 0
    if shutil.which("benchmark_model") is None:  # no per-op times here, and the report says why
        assert p["op_times"]["available"] is False and "benchmark_model" in p["op_times"]["reason"]
    log = tmp_path / "args.txt"  # a benchmark_model printing a real op profile: its times are the top-K
    profile = (DATA / "benchmark_model_op_profile_xnnpack.txt").read_text()
    _fake_tool(tmp_path / "bin", "benchmark_model", profile, log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    p = s.placement(None, 0)
    assert p["on_accelerator"] == p["ops"] > 0  # placement still from the interpreter's node list
    assert p["op_times"] == {"available": True, "source": "benchmark_model --enable_op_profiling", "ops": 5}
    assert p["slowest"][0]["op"] == "Convolution (NHWC, QC8) DWConv" and p["cost_unit"] == "ms"
    args = log.read_text().split()
    assert f"--graph={tmp_path / 'm.tflite'}" in args and "--enable_op_profiling=true" in args
    from edge_msd.bench import vendor  # ai-edge-litert ships Google's Python benchmark tool

    if vendor.find_tool("litert") == "ai_edge_litert.tools.benchmark_litert_model":
        v = vendor.compare("litert", tmp_path / "m.tflite", 2, 1, 20, {"p50": 0.05}, [], {})
        assert v["tool"] == "benchmark_litert_model" and v["n"] == 20, v
        # this model is faster than the tool's 0.01 ms resolution: no ratio then, and it says why
        assert v.get("ratio", 0) > 0 or v["error"].endswith("printed p50 0 ms: below its resolution")


def test_litert_int8_quantize_and_dequantize():
    """The int8 I/O arithmetic of LiteRtSession, on a stand-in interpreter with known parameters."""

    class FakeInterp:
        def __init__(self):
            self.t = {}

        def get_input_details(self):
            return [{"index": 0, "dtype": np.int8, "shape": np.array([1, 4]), "quantization": (0.5, -3)}]

        def get_output_details(self):
            return [{"index": 1, "dtype": np.int8, "shape": np.array([1, 4]), "quantization": (0.25, 2)}]

        def set_tensor(self, i, v):
            self.t[i] = v

        def invoke(self):
            self.t[1] = self.t[0]

        def get_tensor(self, i):
            return self.t[i]

    s = runtimes.LiteRtSession(FakeInterp(), "fake", 1, True, Path("m.tflite"))
    q = s.prepare(np.array([[0.0, 1.0, -100.0, 100.0]], np.float32))
    assert q.dtype == np.int8 and q.tolist() == [[-3, -1, -128, 127]]  # round(x/0.5) - 3, clipped
    np.testing.assert_allclose(s.run(q), (q.astype(np.float32) - 2) * 0.25)


# A LiteRT node list as ai-edge-litert 2.3 gives it with XNNPACK applied (a LayerNorm + GELU + linear
# + L2-norm model): originals 0..5 stay listed, DELEGATE nodes 6 and 7 follow; POW (4) ran outside.
LITERT_NODES = [
    {"index": 0, "op_name": "CONV_2D", "inputs": [0, 1, 2], "outputs": [10]},
    {"index": 1, "op_name": "GELU", "inputs": [10], "outputs": [11]},
    {"index": 2, "op_name": "MUL", "inputs": [11, 11], "outputs": [12]},
    {"index": 3, "op_name": "SUM", "inputs": [12, 3], "outputs": [13]},
    {"index": 4, "op_name": "POW", "inputs": [13, 4], "outputs": [14]},
    {"index": 5, "op_name": "DIV", "inputs": [11, 14], "outputs": [15]},
    {"index": 6, "op_name": "DELEGATE", "inputs": [0, 1, 2, 3], "outputs": [11, 13]},
    {"index": 7, "op_name": "DELEGATE", "inputs": [11, 14], "outputs": [15]},
]


def test_litert_ops_outside_the_delegate():
    from edge_msd.delegation import executed_ops

    assert executed_ops(LITERT_NODES, [15]) == {4}
    assert executed_ops([n for n in LITERT_NODES if n["op_name"] != "DELEGATE"], [15]) == {0, 1, 2, 3, 4, 5}


def test_tflite_runtime_with_numpy2_says_what_to_install(monkeypatch):
    from edge_msd.bench.runtimes import litert

    monkeypatch.setattr(litert.LiteRtBackend, "module_name", classmethod(lambda cls: "tflite_runtime"))
    monkeypatch.setattr(litert, "_dist_version", lambda dist: "2.14.0")
    monkeypatch.setattr(np, "__version__", "2.2.6")
    reason = litert.LiteRtBackend.unavailable_reason()
    assert reason.startswith("tflite-runtime 2.14.0 needs numpy 1.x but numpy 2.2.6 is installed")
    assert 'pip install "numpy<2"' in reason and "ai-edge-litert" in reason
    with pytest.raises(runtimes.RuntimeMissing, match=r"numpy<2"):
        litert.LiteRtBackend().load({}, Path("m.tflite"), 1, 1, {})
    monkeypatch.setattr(np, "__version__", "1.26.4")
    assert litert.numpy_abi_problem("tflite_runtime") is None
    monkeypatch.setattr(np, "__version__", "2.2.6")
    assert litert.numpy_abi_problem("ai_edge_litert") is None
