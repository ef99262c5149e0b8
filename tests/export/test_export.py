"""Exporters on a tiny open_clip student: ONNX and TFLite run here with parity; Core ML spec;
TensorRT's ONNX checks; int8 bundles made by the quant recipes; target profiles and their errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import make_tiny_student, tiny_dataset

from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.export.bundle import ExportConfig, export_bundle
from edge_msd.families.common.base import ExportRequest
from edge_msd.pipeline import export_target
from edge_msd.students.towers import load_student_towers
from edge_msd.targets import load_target


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("s") / "student")


@pytest.fixture(scope="module")
def student(student_dir):
    return load_student_towers(student_dir)


DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"  # real drawn scenes at the tiny student's size
TABLE = [49408, 32]  # the tiny student's token-embedding table: int8 rows in every int8 bundle
TABLE_FP32_BYTES = 49408 * 32 * 4


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    from edge_msd.data import open_dataset
    from edge_msd.quant.calibration import build_calibration_set, save_calibration_set

    cs = build_calibration_set(open_dataset(DATA, "train"), 32)
    return save_calibration_set(cs, tmp_path_factory.mktemp("cal") / "cal.json")


def _export(tmp_path, student_dir, target, precision=None, **kw):
    cfg = ExportConfig(target=target, student=str(student_dir), precision=precision,
                       out=str(tmp_path / target), probe_images=8, **kw)
    return export_bundle(cfg, dataset=tiny_dataset())


def _export_int8(tmp_path, student_dir, target, calibration, **kw):
    """int8 without --quantized: the pipeline runs the quant stage's PTQ on a calibration set, then exports.
    The parity probe is the whole tiny test split: on 8 images of this random student (reference R@1 22%)
    one image's rank flipping under int8 noise moves ΔR@1 by 12.5 points with the cosines unchanged."""
    cfg = ExportConfig(target=target, student=str(student_dir), precision="int8", out=str(tmp_path / target),
                       data=DATA, probe_images=16, calibration=str(calibration), **kw)
    return export_target(cfg)


def test_export_stage_alone_refuses_int8_without_an_artifact(tmp_path, student_dir):
    """export never quantizes: without --quantized it names the command that makes the artifact."""
    cfg = ExportConfig(target="tflite", student=str(student_dir), precision="int8", out=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="edge-msd ptq --target tflite"):
        export_bundle(cfg, dataset=tiny_dataset())
    assert not (tmp_path / "b").exists()


def test_text_tower_int32_matches_open_clip(student):
    toks = student.tokenizer(["a cat", "", "a dog " * 30])
    with torch.no_grad():
        ref = student.model.encode_text(toks, normalize=True)
        out = student.text(toks.to(torch.int32))
    assert torch.allclose(ref, out, atol=1e-6)


@pytest.mark.slow
def test_onnx_bundle_parity(tmp_path, student_dir):
    m = _export(tmp_path, student_dir, "onnx")
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999
    assert m["models"]["text"]["inputs"][0] == {"name": "tokens", "shape": [-1, 16], "dtype": "int32"}
    assert m["models"]["image"]["outputs"][0]["name"] == "embedding"
    assert m["delegate_check"] == {}  # ONNX Runtime places nodes on the device; nothing to check here


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


def test_tensorrt_onnx_checks(tmp_path, student):
    from edge_msd.families.tensorrt import FAMILY, check_tensorrt_onnx

    entries = FAMILY.export(ExportRequest(student, load_target("jetson"), "fp16"), tmp_path)
    for e in entries.values():
        assert e["tensorrt_check"]["opset"] == 17 and e["tensorrt_check"]["qdq_pairs"] == 0
        assert e["outputs"][0]["shape"] == [-1, 32]  # dynamic batch, the student's embedding width
        assert all(i["dtype"] != "int64" for i in e["inputs"] + e["outputs"])
    with pytest.raises(ArtifactError, match="no QuantizeLinear"):
        check_tensorrt_onnx(tmp_path / entries["image"]["file"], expect_qdq=True)


@pytest.mark.slow
def test_tensorrt_int8_bundle_is_qdq_onnx(tmp_path, student_dir, calibration):
    import onnx

    m = _export_int8(tmp_path, student_dir, "jetson", calibration)
    for tower in ("image", "text"):
        e = m["models"][tower]
        assert e["precision"] == "int8" and e["tensorrt_check"]["qdq_pairs"] > 0
        assert e["outputs"][0]["shape"] == [-1, 32]
        graph = onnx.load(str(tmp_path / "jetson" / e["file"])).graph
        assert "QuantizeLinear" in {n.op_type for n in graph.node}
    text = tmp_path / "jetson" / m["models"]["text"]["file"]
    graph = onnx.load(str(text)).graph
    tables = {i.name: i for i in graph.initializer if list(i.dims) == TABLE}
    assert [t.data_type for t in tables.values()] == [onnx.TensorProto.INT8]
    dq = next(n for n in graph.node if n.input and n.input[0] in tables)
    assert dq.op_type == "DequantizeLinear" and [a.i for a in dq.attribute if a.name == "axis"] == [0]
    assert any(n.op_type == "Gather" and n.input[0] == dq.output[0] for n in graph.node)
    assert text.stat().st_size * 3 < TABLE_FP32_BYTES
    assert m["parity"]["passed"] and m["quantization"]["recipe"]["name"] == "tensorrt-int8-qdq"
    assert m["quantization"]["towers"]["image"]["kept_float"]  # first/last layers stay float
    # ... and export says which compute layers TensorRT will therefore build in fp16/fp32, not int8
    (image,) = [w for w in m["delegate_warnings"] if w.startswith("jetson-orin image tower: int8:")]
    assert "run in fp16/fp32" in image and "Conv×1" in image  # the kept-float patch embedding


def test_tensorrt_rejects_unsupported_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge_msd.families.tensorrt import check_tensorrt_onnx

    node = helper.make_node("StringNormalizer", ["x"], ["y"], name="layer7/norm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match="StringNormalizer.*layer7/norm"):
        check_tensorrt_onnx(tmp_path / "m.onnx", expect_qdq=False)



def test_build_engine_without_tensorrt_says_so(tmp_path, student_dir):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    from edge_msd.bench.engine import build_engines
    from edge_msd.errors import EdgeMSDError

    m = _export(tmp_path, student_dir, "jetson")
    assert m["parity"]["passed"] and m["target"]["exporter"] == "tensorrt"
    with pytest.raises(EdgeMSDError, match="TensorRT is not installed"):
        build_engines(tmp_path / "jetson")


@pytest.mark.slow
def test_coreml_spec(tmp_path, student_dir):
    from edge_msd.export.bundle import verify_bundle

    m = _export(tmp_path, student_dir, "coreml")
    assert verify_bundle(tmp_path / "coreml").manifest == m  # .mlpackage folders: every file listed
    text = m["models"]["text"]
    assert text["precision"] == "fp16" and text["inputs"][0]["dtype"] == "int32"
    ops = text["coreml_check"]["ops"]
    assert set(ops["layer_norm"]) == {"FLOAT32"} and set(ops["softmax"]) == {"FLOAT32"}
    assert "FLOAT16" in ops["linear"]
    assert m["parity"]["passed"] is None and "macOS" in m["parity"]["skipped"]
    for tower in ("image", "text"):  # the L2 norm: fp32 from reduce_l2_norm through its clamp to the divide
        assert m["models"][tower]["coreml_check"]["l2_norms_fp32"] == 1
        ops = m["models"][tower]["coreml_check"]["ops"]
        assert set(ops["maximum"]) == set(ops["tile"]) == set(ops["reduce_l2_norm"]) == {"FLOAT32"}


@pytest.mark.slow
def test_coreml_int8_w8a8_bundle(tmp_path, student_dir, calibration):
    m = _export_int8(tmp_path, student_dir, "coreml", calibration)
    for tower in ("image", "text"):
        e = m["models"][tower]
        ops = e["coreml_check"]["ops"]
        assert e["precision"] == "int8" and set(ops["quantize"]) == {"INT8"}
        assert "constexpr_affine_dequantize" in ops  # int8 weights
        assert set(ops["layer_norm"]) == {"FLOAT32"}
    assert m["models"]["text"]["inputs"][0] == {"name": "tokens", "shape": [1, 16], "dtype": "int32"}
    gathers = m["models"]["text"]["coreml_check"]["ops"]["gather"]  # int8 rows, then their float scales
    assert gathers == {"INT8": 1, "FLOAT32": 1}
    text = tmp_path / "coreml" / m["models"]["text"]["file"]
    assert sum(f.stat().st_size for f in text.rglob("*") if f.is_file()) * 3 < TABLE_FP32_BYTES
    assert m["quantization"]["recipe"]["name"] == "coreml-w8a8" and m["calibration"]["n"] == 32
    assert m["parity"]["passed"] is None and m["parity"]["thresholds"]["min_cos"] == 0.95


@pytest.mark.slow
def test_export_cli_reads_a_toml_config(tmp_path, student_dir):
    """Every export option can come from a file ([export] table); the command line wins."""
    from click.testing import CliRunner

    from edge_msd.cli import main
    from edge_msd.contract.integrity import bundle_digest

    conf = tmp_path / "export.toml"
    conf.write_text(f'[export]\ntarget = "onnx"\nstudent = "{student_dir}"\ndata = "{DATA}"\n'
                    f'probe_images = 4\neval_images = 4\nout = "{tmp_path / "ignored"}"\n')
    res = CliRunner().invoke(main, ["export", "--config", str(conf), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert f"bundle digest: {bundle_digest(m)}" in res.output  # the export summary prints it
    assert m["config"]["target"] == "onnx" and m["config"]["probe_images"] == 4
    assert m["config"]["out"] == str(tmp_path / "b") and not (tmp_path / "ignored").exists()
    assert m["parity"]["probe"]["images"] == 4 and m["quantization"] is None and m["calibration"] is None
    conf.write_text(conf.read_text() + "probe_imgs = 3\n")
    res = CliRunner().invoke(main, ["export", "--config", str(conf)])
    assert res.exit_code == 2 and "unknown field(s) probe_imgs" in res.output


def test_coreml_predicts_on_macos(tmp_path, student_dir):
    import platform

    if platform.system() != "Darwin":
        pytest.skip("Core ML predictions need macOS")
    m = _export(tmp_path, student_dir, "coreml")
    assert m["parity"]["passed"]


def test_unknown_target_lists_known():
    with pytest.raises(ConfigError, match="unknown target 'pixel'.*jetson.*tflite"):
        load_target("pixel")


def test_profile_missing_and_wrong_field(tmp_path):
    p = tmp_path / "dev.toml"
    p.write_text('exporter = "onnx"\nprecision = "fp32"\n')
    with pytest.raises(ConfigError, match="dev.toml: missing field.*precisions"):
        load_target(p)
    onnx = Path(load_target("onnx").source).read_text()  # the shipped profile, from any working folder
    p.write_text(onnx.replace('exporter = "onnx"', 'exporter = "openvino"'))
    with pytest.raises(ConfigError, match="field 'exporter'"):
        load_target(p)
    p.write_text("batchsize = 3\n" + onnx)
    with pytest.raises(ConfigError, match="unknown field.*batchsize"):
        load_target(p)


def test_profile_options_and_bench_are_typed_by_the_family(tmp_path):
    p = tmp_path / "dev.toml"
    onnx = Path(load_target("onnx").source).read_text()
    tflite = Path(load_target("tflite").source).read_text()
    assert load_target("onnx").options.opset == 18 and load_target("jetson").options.opset == 17
    fp16 = onnx.replace('precisions = ["fp32"]', 'precisions = ["fp32", "fp16"]')
    bad = [  # (profile text, the error it gets)
        (onnx.replace("opset = 18", "opset = 18\nopsett = 17"),
         r"dev.toml \[options\]: unknown field\(s\) opsett; known: image_input, opset"),
        (onnx.replace("opset = 18", 'opset = "18"'),
         r"dev.toml \[options\]: field 'opset': expected int, got '18'"),
        (onnx.replace("opset = 18", "opset = 16"),
         r"dev.toml \[options\]: field 'opset' is 16; expected 17 or later"),
        (onnx.replace("opset = 18", "opset = 18\n[options.quant]\nkeep_float = []"),
         r"dev.toml: \[options.quant\]: onnx has no int8 recipe"),
        (onnx.replace("warmup = 10", "warmup = 10\nwarm_up = 3"),
         r"dev.toml \[bench\]: unknown field\(s\) warm_up; known: duration"),
        (onnx.replace('runtime = "onnxruntime"', 'runtime = "litert"'),
         r"dev.toml: \[bench\] runtime 'litert' cannot run onnx files"),
        (fp16 + "[parity.fp16]\nmin_cos = 0.99\nmax_delta_r1 = 2.0\n",
         r"dev.toml: field 'precisions' has fp16, which onnx does not"),
        (tflite.replace("dynamic_batch = false", "dynamic_batch = true"),
         r"dev.toml: dynamic_batch is not supported by tflite; set false"),
        (tflite.replace("[bench]", "[options]\ndelegate = 'gpu'\n[bench]"),
         r"dev.toml \[options\]: unknown field\(s\) delegate; known: image_input, quant"),
    ]
    for text, error in bad:
        p.write_text(text)
        with pytest.raises(ConfigError, match=error):
            load_target(p)


def test_not_a_student_folder(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="open_clip_model.safetensors is missing"):
        load_student_towers(tmp_path)


def test_export_loads_a_student_only_with_verified_hashes(tmp_path, student_dir):
    """The towers come from the one student loader: a changed weight file is refused before loading."""
    import shutil

    copy = tmp_path / "student"
    shutil.copytree(student_dir, copy)
    weights = copy / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="open_clip_model.safetensors"):
        load_student_towers(copy)


def test_existing_output_refused(tmp_path, student_dir):
    (tmp_path / "onnx").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        _export(tmp_path, student_dir, "onnx")


@pytest.mark.slow
def test_failing_parity_fails_export(tmp_path, student_dir):
    p = tmp_path / "strict.toml"
    p.write_text(Path(load_target("onnx").source).read_text().replace("min_cos = 0.999", "min_cos = 1.01"))
    cfg = dict(target=str(p), student=str(student_dir), out=str(tmp_path / "b"), probe_images=8)
    data = dict(dataset=tiny_dataset())
    with pytest.raises(ArtifactError, match="parity failed"):
        export_bundle(ExportConfig(**cfg), **data)
    assert not (tmp_path / "b").exists()
    m = export_bundle(ExportConfig(**cfg, allow_parity_fail=True), **data)
    assert m["parity"]["passed"] is False and (tmp_path / "b" / "manifest.json").is_file()
    assert np.load(tmp_path / "b" / "probe.npz")["images"].dtype == np.uint8
