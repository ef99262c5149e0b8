"""The image input contract: uint8 NHWC frames with the normalise folded into the model, or float NCHW
normalised by the host (old bundles), decided in one place (edge_msd.contract.reading)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import make_tiny_student, tiny_dataset

from edge_msd.contract.reading import (
    IN_MODEL,
    image_model_input,
    open_bundle,
    preprocess_images,
    tower_inputs,
)
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.export.bundle import ExportConfig, export_bundle
from edge_msd.families.common.fused_input import FusedImageInput, uint8_example
from edge_msd.students.towers import load_student_towers
from edge_msd.targets import known_targets, load_target


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("s") / "student")


def _profile(tmp_path: Path, target: str, image_input: str) -> Path:
    """A copy of the packaged profile ``target`` asking for ``image_input``."""
    text = known_targets()[target].read_text()
    if "[options]" not in text:
        text += "\n[options]\n"
    path = tmp_path / f"{target}-{image_input}.toml"
    path.write_text(text.replace("[options]\n", f'[options]\nimage_input = "{image_input}"\n', 1))
    return path


def _export(tmp_path, student_dir, profile: Path, precision=None) -> dict:
    cfg = ExportConfig(target=str(profile), student=str(student_dir), precision=precision,
                       out=str(tmp_path / profile.stem), probe_images=8)
    return export_bundle(cfg, dataset=tiny_dataset())


PRE = {"scale": 1 / 255, "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "layout": "NCHW"}
FUSED = {"name": "image", "dtype": "uint8", "layout": "NHWC", "shape": [-1, 4, 4, 3], IN_MODEL: True}


def test_fused_module_equals_host_normalise(student_dir):
    student = load_student_towers(student_dir)
    frames = uint8_example(3, student.preprocess.size)
    with torch.no_grad():
        fused = FusedImageInput(student.image, student.preprocess)(torch.from_numpy(frames))
        host = student.image(torch.from_numpy(student.preprocess.normalise(frames)))
    assert torch.allclose(fused, host, atol=1e-6)


def test_one_function_decides_from_the_contract():
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    old = {"name": "image", "shape": [1, 3, 4, 4], "dtype": "float32"}  # no flag: normalised by the host
    np.testing.assert_array_equal(image_model_input(frames, PRE, old), preprocess_images(frames, PRE))
    np.testing.assert_array_equal(image_model_input(frames, PRE, FUSED), frames)


@pytest.mark.parametrize("query", [np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 3, 4, 4), np.uint8)])
def test_wrong_query_names_the_contract(query):
    with pytest.raises(ArtifactError) as e:
        image_model_input(query, PRE, FUSED)
    msg = str(e.value)
    assert "\n" not in msg and "takes uint8 NHWC N×4×4×3 (normalised in the model)" in msg


def test_option_is_typed(tmp_path):
    assert load_target("onnx").options.image_input == "uint8_nhwc"
    assert load_target("tflite").options.image_input == "float_nchw"
    with pytest.raises(ConfigError, match="image_input"):
        load_target(_profile(tmp_path, "onnx", "uint8_nchw"))


def test_int8_refuses_the_fused_input(tmp_path, student_dir):
    with pytest.raises(ConfigError, match="do not fuse"):
        _export(tmp_path, student_dir, _profile(tmp_path, "tflite", "uint8_nhwc"), precision="int8")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "jetson-orin"])
def test_onnx_fused_input_bundle(tmp_path, student_dir, target):
    """The ONNX graph (dynamo; TorchScript for TensorRT) takes uint8 NHWC: Transpose, Cast, Mul, Add
    before the first Conv; parity is measured through it, and the bench input is the uint8 frames."""
    import onnx

    m = _export(tmp_path, student_dir, _profile(tmp_path, target, "uint8_nhwc"), precision="fp32")
    folder = tmp_path / f"{target}-uint8_nhwc"
    contract = m["models"]["image"]["inputs"][0]
    assert contract == {"name": "image", "shape": [-1, 32, 32, 3], "dtype": "uint8", "layout": "NHWC",
                        IN_MODEL: True}
    # TensorRT's parity runs the engine's source ONNX in ONNX Runtime
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999
    graph = onnx.load(str(folder / m["models"]["image"]["file"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.index("Cast") < ops.index("Mul") < ops.index("Add") < ops.index("Conv")
    bundle = open_bundle(folder)
    x = tower_inputs(bundle, "image", bundle.load_npz("probe.npz"))
    assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)


@pytest.mark.slow
def test_litert_float_fused_input_bundle(tmp_path, student_dir):
    """litert-torch keeps the uint8 input and its cast; no TRANSPOSE is left before the first conv."""
    from edge_msd.families.tflite import interpreter

    m = _export(tmp_path, student_dir, _profile(tmp_path, "tflite", "uint8_nhwc"), precision="fp32")
    contract = m["models"]["image"]["inputs"][0]
    assert contract["dtype"] == "uint8" and contract["layout"] == "NHWC" and contract[IN_MODEL]
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999
    ops = [o["op_name"] for o in interpreter(tmp_path / "tflite-uint8_nhwc" / m["models"]["image"]["file"])
           ._get_ops_details()]
    assert "CAST" in ops and "TRANSPOSE" not in ops[: ops.index("CONV_2D")]


@pytest.mark.slow
def test_coreml_image_type_spec(tmp_path, student_dir):
    """Core ML's own preprocessing: an RGB ImageType whose scale (1/255) and bias (-mean) open the
    program, then the model's per-channel 1/std; prediction needs macOS, so the spec is what is checked."""
    import coremltools as ct

    m = _export(tmp_path, student_dir, _profile(tmp_path, "coreml", "uint8_nhwc"), precision="fp32")
    contract = m["models"]["image"]["inputs"][0]
    assert contract == {"name": "image", "shape": [1, 32, 32, 3], "dtype": "uint8", "layout": "NHWC",
                        IN_MODEL: True}
    spec = ct.models.MLModel(str(tmp_path / "coreml-uint8_nhwc" / m["models"]["image"]["file"]),
                             skip_model_load=True).get_spec()
    image = spec.description.input[0].type.imageType
    assert (image.width, image.height) == (32, 32)
    assert image.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    ops = next(iter(spec.mlProgram.functions["main"].block_specializations.values())).operations
    consts = {op.outputs[0].name: op.attributes["val"].immediateValue for op in ops if op.type == "const"}
    first = [op for op in ops if op.type != "const"][:2]
    assert [op.type for op in first] == ["mul", "add"]

    def value(op, arg):  # the constant an op reads as ``arg``
        imm = consts[op.inputs[arg].arguments[0].name]
        return np.asarray(imm.tensor.floats.values or [imm.tensor.floats.values], np.float32)

    y_arg = "y"
    assert np.allclose(value(first[0], y_arg), 1 / 255)
    mean = load_student_towers(student_dir).preprocess.mean
    assert np.allclose(value(first[1], y_arg).ravel(), -np.asarray(mean), atol=1e-6)


@pytest.mark.slow
def test_executorch_fused_input_bundle(tmp_path, student_dir):
    """The same FusedImageInput lowered to XNNPACK; the .pte's input is uint8 (N, H, W, 3)."""
    m = _export(tmp_path, student_dir, _profile(tmp_path, "executorch", "uint8_nhwc"), precision="fp32")
    contract = m["models"]["image"]["inputs"][0]
    assert contract == {"name": "image", "shape": [1, 32, 32, 3], "dtype": "uint8", "layout": "NHWC",
                        IN_MODEL: True}
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999
