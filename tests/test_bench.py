"""The on-device benchmark: runtime selection, timing loop, statistics, reports, the .pyz binary.

Bundles here are tiny ONNX graphs built with onnx.helper (no torch), laid out as docs/bundle.md says,
with reference embeddings computed in numpy, so parity and recall have known answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_msd.artifacts import atomic_write_json, file_hashes
from edge_msd.bench import runtimes, sysinfo
from edge_msd.bench.bundle import open_bundle, preprocess_images
from edge_msd.bench.options import BenchOptions
from edge_msd.bench.report import SCHEMA, format_table, load_report, merge_reports
from edge_msd.bench.run import embed, profile_defaults, run_bench
from edge_msd.bench.timing import Deadline, Timing, latency_stats, time_loop
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.eval.retrieval import retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]
H = W = 8
DIM, VOCAB, CTX = 16, 50, 6
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tower_graph(kind: str, weight: np.ndarray, path: Path) -> None:
    """image: flatten → matmul → L2 norm; text: gather → mean over tokens → L2 norm (dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind == "image":
        inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, H, W])
        nodes = [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["raw"]),
        ]
    else:
        inp = helper.make_tensor_value_info("tokens", TensorProto.INT32, ["batch", CTX])
        nodes = [
            helper.make_node("Gather", ["W", "tokens"], ["emb"], axis=0),
            helper.make_node("ReduceMean", ["emb", "axes"], ["raw"], keepdims=0),
        ]
    nodes += [
        helper.make_node("ReduceL2", ["raw", "axes_last"], ["norm"], keepdims=1),
        helper.make_node("Div", ["raw", "norm"], ["embedding"]),
    ]
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
    ]
    if kind == "text":
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])
    graph = helper.make_graph(nodes, kind, [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _reference(kind: str, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What the graph computes, in numpy: the 'PyTorch student' of these tests."""
    raw = x.reshape(len(x), -1) @ weight if kind == "image" else weight[x].mean(axis=1)
    return _normalise(raw.astype(np.float32))


def make_bundle(root: Path, n_images: int = 12, caps_per_image: int = 2, target: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    (root / "models").mkdir(parents=True)
    w_img = rng.normal(size=(3 * H * W, DIM))
    w_txt = rng.normal(size=(VOCAB, DIM))
    _tower_graph("image", w_img, root / "models" / "image.onnx")
    _tower_graph("text", w_txt, root / "models" / "text.onnx")
    pre = {
        "size": [H, W],
        "resize": "bicubic",
        "crop": "center",
        "color_order": "RGB",
        "scale": 1 / 255,
        "mean": MEAN,
        "std": STD,
        "layout": "NCHW",
    }
    for name in ("probe", "evalset"):
        images = rng.integers(0, 256, size=(n_images, H, W, 3), dtype=np.uint8)
        tokens = rng.integers(0, VOCAB, size=(n_images * caps_per_image, CTX)).astype(np.int32)
        cap_img = np.repeat(np.arange(n_images), caps_per_image).astype(np.int64)
        arrays = {
            "images": images,
            "tokens": tokens,
            "caption_image_index": cap_img,
            "texts": np.array([f"caption {i}" for i in range(len(tokens))]),
        }
        if name == "probe":
            arrays["image_emb"] = _reference("image", w_img, preprocess_images(images, pre))
            arrays["text_emb"] = _reference("text", w_txt, tokens)
        np.savez(root / f"{name}.npz", **arrays)
    entry = {
        "format": "onnx",
        "precision": "fp32",
        "outputs": [{"name": "embedding", "shape": [-1, DIM], "dtype": "float32"}],
    }
    manifest = {
        "kind": "edge-msd-bundle",
        "schema_version": 1,
        "producer": {},
        "config": {},
        "target": target or {"name": "onnx", "batch_sizes": [1, 4], "bench": {"warmup": 2, "iterations": 5}},
        "student": {"name": "tiny", "source": "test", "sha256": ""},
        "models": {
            "image": {
                **entry,
                "file": "models/image.onnx",
                "inputs": [{"name": "image", "shape": [-1, 3, H, W], "dtype": "float32", "layout": "NCHW"}],
            },
            "text": {
                **entry,
                "file": "models/text.onnx",
                "inputs": [{"name": "tokens", "shape": [-1, CTX], "dtype": "int32"}],
            },
        },
        "preprocessing": pre,
        "tokenizer": {"dir": "tokenizer", "context_length": CTX, "sot_token": 49406, "eot_token": 49407},
        "parity": {},
        "calibration": None,
        "files": file_hashes(root),
    }
    atomic_write_json(root / "manifest.json", manifest)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "onnx")


def _opts(bundle: Path, out: Path, **kw) -> BenchOptions:
    base = {"bundle": str(bundle), "out": str(out), "iters": 5, "warmup": 1, "batch": [1, 4], "threads": 1}
    return BenchOptions(**{**base, **kw})


# ---- statistics and the timing loop ---------------------------------------------------------


def test_latency_stats_on_known_data():
    s = latency_stats(np.arange(1, 101) * 1_000_000)  # 1..100 ms
    assert s["n"] == 100 and s["min"] == 1.0 and s["max"] == 100.0
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101)))
    # numpy's linear interpolation: p-th percentile of 1..100 = 1 + 0.99 * p
    for p in (50, 90, 95, 99):
        assert s[f"p{p}"] == pytest.approx(1 + 0.99 * p)
    assert latency_stats([]) == {"n": 0}


def test_time_loop_structure_first_warmup_rotation():
    calls = []
    pool = ["a", "b", "c"]
    t = time_loop(calls.append, pool, warmup=4, iters=7)
    # 1 first inference + 4 warm-up (not timed) + 7 timed, inputs rotating through the pool
    assert len(calls) == 12 and t.warmup == 4 and len(t.samples_ns) == 7
    assert calls[:5] == ["a", "b", "c", "a", "b"]
    assert calls[5:] == ["a", "b", "c", "a", "b", "c", "a"]
    assert t.first_ns is not None and t.wall_ns >= sum(t.samples_ns) and t.stopped is None
    summary = t.summary(batch=2)
    assert summary["iters"] == 7 and summary["complete"] and summary["throughput_items_per_s"] > 0


def test_time_loop_duration_and_deadline():
    t = time_loop(lambda x: time.sleep(0.002), [0], warmup=0, iters=None, duration_s=0.05)
    assert len(t.samples_ns) >= 3 and t.stopped is None
    t = time_loop(lambda x: None, [0], warmup=0, iters=10**9, deadline=Deadline(time.monotonic_ns() - 1))
    assert t.stopped == "time limit" and t.samples_ns == [] and not t.summary(1)["complete"]


def test_time_loop_keeps_samples_on_ctrl_c():
    n = {"calls": 0}

    def run(_):
        n["calls"] += 1
        if n["calls"] == 9:
            raise KeyboardInterrupt

    timing = Timing()
    with pytest.raises(KeyboardInterrupt):
        time_loop(run, [0], warmup=2, iters=100, timing=timing)
    assert len(timing.samples_ns) == 5 and timing.wall_ns > 0  # 1 first + 2 warm-up + 5 timed, 9th raised


# ---- runtimes -------------------------------------------------------------------------------


def test_auto_picks_onnxruntime_and_lists_installed(bundle):
    files = runtimes.model_files(bundle, open_bundle(bundle).manifest["models"], None)
    assert runtimes.select_backend("auto", files) is runtimes.OnnxRuntimeBackend
    assert "onnxruntime" in runtimes.installed_runtimes()


def test_runtime_that_cannot_run_the_bundle_says_why(bundle):
    files = runtimes.model_files(bundle, open_bundle(bundle).manifest["models"], None)
    with pytest.raises(
        ConfigError, match=r"runs tflite models, but this bundle has image: onnx.*onnxruntime"
    ):
        runtimes.select_backend("litert", files)
    with pytest.raises(ConfigError, match="unknown runtime 'foo'; known: auto, tensorrt"):
        runtimes.select_backend("foo", files)


@pytest.mark.skipif(
    runtimes.TensorRtBackend.unavailable_reason() is None, reason="TensorRT is installed here"
)
def test_missing_runtime_names_what_is_installed():
    engines = {"image": {"plan": Path("image.plan")}, "text": {"plan": Path("text.plan")}}
    with pytest.raises(
        runtimes.RuntimeMissing,
        match=r"tensorrt cannot run here: tensorrt not installed.*"
        r"Installed: .*onnxruntime \d",
    ):
        runtimes.select_backend("trt", engines)
    tflite_only = {"image": {"tflite": Path("i.tflite")}, "text": {"tflite": Path("t.tflite")}}
    if runtimes.LiteRtBackend.unavailable_reason() is not None:
        with pytest.raises(runtimes.RuntimeMissing, match="no runtime installed here can run"):
            runtimes.select_backend("auto", tflite_only)
    else:
        assert runtimes.select_backend("auto", tflite_only) is runtimes.LiteRtBackend


def test_engine_next_to_the_onnx_is_found(bundle, tmp_path):
    (tmp_path / "image.plan").write_bytes(b"x")
    files = runtimes.model_files(bundle, open_bundle(bundle).manifest["models"], tmp_path)
    assert files["image"]["plan"] == tmp_path / "image.plan" and "plan" not in files["text"]
    # TensorRT needs an engine for every tower: the text tower has none
    with pytest.raises(
        ConfigError,
        match=r"runs plan models, but this bundle has image: onnx, plan; text: onnx "
        r"\(build the engine on the device: edge-msd build-engine\)",
    ):
        runtimes.select_backend("tensorrt", files)


def test_unknown_ort_provider_lists_available(bundle):
    b = open_bundle(bundle)
    msg = "'NoSuchExecutionProvider' is not available here; available: .*CPU"
    with pytest.raises(ConfigError, match=msg):
        runtimes.OnnxRuntimeBackend().load(
            b.model("image"), b.model_path("image"), 1, 1, {"provider": "NoSuchExecutionProvider"}
        )


@pytest.mark.device
@pytest.mark.skipif(
    runtimes.TensorRtBackend.unavailable_reason() is not None,
    reason=f"TensorRT: {runtimes.TensorRtBackend.unavailable_reason()}",
)
def test_tensorrt_session_runs_an_engine(bundle):  # pragma: no cover - on the Jetson
    plan = bundle / "models" / "image.plan"
    if not plan.exists():
        pytest.skip("build the engine first: edge-msd build-engine")
    b = open_bundle(bundle)
    s = runtimes.TensorRtBackend().load(b.model("image"), plan, None, 1, {})
    x = preprocess_images(b.load_npz("probe.npz")["images"][:1], b.manifest["preprocessing"])
    assert s.run(s.prepare(x)).shape == (1, DIM)
    s.close()


@pytest.mark.device
@pytest.mark.skipif(
    runtimes.CoreMlBackend.unavailable_reason() is not None,
    reason=f"Core ML: {runtimes.CoreMlBackend.unavailable_reason()}",
)
def test_coreml_backend_is_selected_for_mlpackages():  # pragma: no cover - on macOS
    files = {"image": {"mlpackage": Path("image.mlpackage")}, "text": {"mlpackage": Path("text.mlpackage")}}
    assert runtimes.select_backend("auto", files) is runtimes.CoreMlBackend


def test_litert_session_fp32_and_int8_io(tmp_path):
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

    s = runtimes.LiteRtSession(FakeInterp(), "fake", 1, True)
    q = s.prepare(np.array([[0.0, 1.0, -100.0, 100.0]], np.float32))
    assert q.dtype == np.int8 and q.tolist() == [[-3, -1, -128, 127]]  # round(x/0.5) - 3, clipped
    np.testing.assert_allclose(s.run(q), (q.astype(np.float32) - 2) * 0.25)


# ---- the whole run --------------------------------------------------------------------------


def test_bench_run_measures_recall_and_parity(bundle, tmp_path, capsys):
    out = tmp_path / "r.json"
    report = run_bench(_opts(bundle, out))
    assert not report["partial"] and json.loads(out.read_text())["schema"] == SCHEMA
    assert report["runtime"]["name"] == "onnxruntime" and report["settings"]["batches"] == [1, 4]
    for tower in ("image", "text"):
        ms = report["towers"][tower]["measurements"]
        assert [m["batch"] for m in ms] == [1, 4]
        for m in ms:
            lat = m["latency_ms"]
            assert m["iters"] == 5 == lat["n"] == len(m["samples_ms"]) and m["warmup_iters"] == 1
            assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert m["load_ms"] > 0 and m["first_inference_ms"] > 0 and m["peak_rss_mb"] > 0
            assert m["session"]["intra_op_threads"] == 1 and m["pool_batches"] >= 1
        assert report["parity"][tower]["min_cos"] > 0.99999
    # recall from the embeddings made here equals recall from the reference embeddings
    probe = np.load(bundle / "probe.npz")
    ref = retrieval_metrics(probe["image_emb"], probe["text_emb"], probe["caption_image_index"])
    assert report["recall"]["probe"] == ref and report["recall"]["probe_delta_mean_R@1"] == 0
    assert report["recall"]["eval"]["n_images"] == 12 and report["recall"]["eval"]["n_texts"] == 24
    env = report["environment"]
    assert env["cpu"] and env["cpu_count"] >= 1 and env["runtimes"]["onnxruntime"]
    table = format_table(report)
    assert "p50 ms" in table and "parity image" in table and "recall eval" in table


def test_profile_defaults_from_target():
    d = profile_defaults({"batch_sizes": [8, 1], "bench": {"warmup": 20, "iterations": 200, "threads": 0}})
    assert d == {"batch": [1, 8], "warmup": 20, "iters": 200}  # threads 0 = runtime default
    assert profile_defaults({}) == {}


def test_embed_pads_the_last_batch(bundle):
    b = open_bundle(bundle)
    s = runtimes.OnnxRuntimeBackend().load(b.model("text"), b.model_path("text"), 1, 5, {})
    tokens = b.load_npz("probe.npz")["tokens"]
    e5 = embed(s, tokens, 5, Deadline())  # 24 rows = 4 × 5 + 4 padded
    np.testing.assert_allclose(e5, b.load_npz("probe.npz")["text_emb"], atol=1e-5)


def test_time_limit_writes_partial_report(bundle, tmp_path):
    out = tmp_path / "p.json"
    report = run_bench(_opts(bundle, out, iters=None, duration=30.0, time_limit=1.0))
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and saved["interrupted"] == "time limit" == report["interrupted"]
    m = saved["towers"]["image"]["measurements"][0]
    assert m["iters"] > 0 and m["complete"] is False and m["latency_ms"]["p50"] > 0
    assert "PARTIAL REPORT (time limit)" in format_table(saved)


def test_ctrl_c_writes_partial_report(bundle, tmp_path, monkeypatch):
    out = tmp_path / "c.json"
    real = runtimes.OrtSession.run
    calls = {"n": 0}

    def run(self, feed):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(self, feed)

    monkeypatch.setattr(runtimes.OrtSession, "run", run)
    report = run_bench(_opts(bundle, out, iters=100, batch=[1]))
    saved = json.loads(out.read_text())
    assert saved["partial"] and saved["interrupted"] == "Ctrl-C" == report["interrupted"]
    assert saved["towers"]["image"]["measurements"][0]["iters"] == 17  # first + 1 warm-up + 17 timed
    assert saved["towers"]["text"]["measurements"] == [] and saved["recall"] is None


def test_tampered_bundle_is_refused_naming_the_file(tmp_path):
    b = make_bundle(tmp_path / "b")
    data = bytearray((b / "models" / "text.onnx").read_bytes())
    data[-1] ^= 0xFF
    (b / "models" / "text.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"models/text\.onnx: sha256 .* differs from manifest"):
        run_bench(_opts(b, tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_missing_tower_and_bad_options(bundle, tmp_path):
    with pytest.raises(ConfigError, match="unknown tower"):
        run_bench(_opts(bundle, tmp_path / "r.json", towers=["audio"]))
    with pytest.raises(ConfigError, match="batch sizes must be"):
        run_bench(_opts(bundle, tmp_path / "r.json", batch=[0]))


# ---- reports --------------------------------------------------------------------------------


def test_report_merges_and_refuses_other_schema(bundle, tmp_path):
    a = tmp_path / "a.json"
    run_bench(_opts(bundle, a, label="board-a", batch=[1]))
    b = json.loads(a.read_text())
    b["device"]["label"] = "board-b"
    atomic_write_json(tmp_path / "b.json", b)
    written = merge_reports([a, tmp_path / "b.json"], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "board-a · onnxruntime · fp32" in md and "board-b" in md and "![recall_vs_latency]" in md
    assert {"latency_image", "latency_text", "recall_vs_latency"} <= set(written)
    assert written["html"].read_text().count("data:image/png;base64,") == 3
    b["schema"] = "edge-msd-bench/2"
    atomic_write_json(tmp_path / "v2.json", b)
    with pytest.raises(ArtifactError, match=r"v2\.json: report schema 'edge-msd-bench/2' is not supported"):
        load_report(tmp_path / "v2.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not an edge-msd bench report"):
        merge_reports([tmp_path / "x.json"], tmp_path / "out2")


# ---- tegrastats -----------------------------------------------------------------------------

ORIN_LINE = (
    "11-16-2024 10:01:02 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [12%@1510,3%@1510,0%@1510,1%@1510,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 61%@[611] "
    "VIC_FREQ 115 APE 200 cpu@48.2C soc2@46.5C tj@48.2C VDD_IN 6912mW/5440mW "
    "VDD_CPU_GPU_CV 1985mW/1120mW VDD_SOC 1583mW/1410mW"
)
NANO_LINE = (
    "RAM 1783/3964MB (lfb 4x2MB) CPU [9%@1479,5%@1479,3%@1479,2%@1479] GR3D_FREQ 0%@76 "
    "PLL@25C CPU@28C POM_5V_IN 2254/2254 POM_5V_GPU 0/0 POM_5V_CPU 479/479"
)


def test_tegrastats_parser_on_recorded_lines():
    orin = sysinfo.parse_tegrastats(ORIN_LINE)
    assert orin["total_mw"] == 6912 and orin["gpu_load_pct"] == 61 and orin["ram_used_mb"] == 2448
    assert orin["rails_mw"] == {"VDD_IN": 6912, "VDD_CPU_GPU_CV": 1985, "VDD_SOC": 1583}
    nano = sysinfo.parse_tegrastats(NANO_LINE)
    assert nano["total_mw"] == 2254 and nano["rails_mw"]["POM_5V_CPU"] == 479 and nano["gpu_load_pct"] == 0
    assert sysinfo.parse_tegrastats("RAM 1/2MB")["total_mw"] is None
    power = sysinfo.summarise_power([orin, {**orin, "total_mw": 5000}])
    assert power["mean_mw"] == 5956 and power["n_samples"] == 2
    e = sysinfo.energy_per_inference(power, wall_ns=2_000_000_000, n_calls=100, batch=4)
    assert e["mJ_per_batch"] == pytest.approx(5956 * 2 / 100) and e["mJ_per_item"] == pytest.approx(
        5956 * 2 / 400
    )


def test_peak_rss_resets_and_grows():
    sysinfo.reset_peak_rss()
    before = sysinfo.peak_rss_mb()
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB touched
    assert sysinfo.peak_rss_mb() >= before + 50 and block.sum() > 0


# ---- the benchmark binary -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pyz") / "edge-msd-bench.pyz"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_bench.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """Run with ``python -S``: no site processing, so the editable edge_msd install is invisible and the
    package comes from the .pyz only; site-packages is on the path for numpy and the runtime, behind a
    ``torch`` that raises on import: the binary must not need it."""
    import site

    poison = tmp_path / "poison"
    poison.mkdir(exist_ok=True)
    (poison / "torch.py").write_text("raise ImportError('the benchmark binary must not import torch')\n")
    path = os.pathsep.join([str(poison), *site.getsitepackages()])
    return {"PATH": os.environ["PATH"], "PYTHONPATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}


def test_pyz_help_and_contents(pyz, tmp_path):
    import zipfile

    names = set(zipfile.ZipFile(pyz).namelist())
    assert {
        "__main__.py",
        "edge_msd/__init__.py",
        "edge_msd/bench/run.py",
        "edge_msd/eval/retrieval.py",
    } <= names
    assert not any(n.startswith(("edge_msd/distill", "edge_msd/export", "edge_msd/teachers")) for n in names)
    r = subprocess.run(
        [sys.executable, "-S", str(pyz), "--help"],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode == 0 and "--bundle" in r.stdout and "--time-limit" in r.stdout


def test_pyz_runs_a_bundle_in_a_clean_env(pyz, bundle, tmp_path):
    out = tmp_path / "pyz.json"
    cmd = [
        sys.executable,
        "-S",
        "-X",
        "importtime",
        str(pyz),
        "--bundle",
        str(bundle),
        "--iters",
        "5",
        "--warmup",
        "1",
        "--batch",
        "1,2",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = load_report(out)
    assert not report["partial"] and report["parity"]["image"]["min_cos"] > 0.99999
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in r.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "onnxruntime" in imported and "numpy" in imported
    assert not {"torch", "open_clip", "click", "matplotlib"} & imported
    assert "recall eval" in r.stdout and "edge_msd" in imported


def test_pyz_tampered_bundle_exit_status(pyz, tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "evalset.npz").write_bytes(b"broken")
    r = subprocess.run(
        [sys.executable, "-S", str(pyz), "--bundle", str(b)],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "evalset.npz: sha256" in r.stderr


def test_pyz_sigterm_writes_partial_report(pyz, bundle, tmp_path):
    out = tmp_path / "t.json"
    p = subprocess.Popen(
        [
            sys.executable,
            "-S",
            str(pyz),
            "--bundle",
            str(bundle),
            "--duration",
            "60",
            "--batch",
            "1",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(tmp_path),
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:  # the report appears once timing has begun
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    report = load_report(out)
    assert report["partial"] and report["interrupted"] == "Ctrl-C"
