"""The export stage on a tiny open_clip student, across families: the export CLI and its config file,
target profiles and their errors, student loading, refused outputs and failing parity (each family's own
exports are in tests/families)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import DATA, _export, tiny_dataset

from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.export.bundle import ExportConfig, export_bundle
from edge_msd.students.towers import load_student_towers
from edge_msd.targets import load_target


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
