"""Bundle layout per docs/bundle.md, verify catching a flipped byte / truncation, CLI verbs."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from export_helpers import make_tiny_student, tiny_dataset

from edge_msd.bench.tokenizer import Tokenizer
from edge_msd.cli import main
from edge_msd.errors import ArtifactError
from edge_msd.export.bundle import ExportConfig, export_bundle, verify_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("b")
    student = make_tiny_student(root / "student")
    cfg = ExportConfig(target="onnx", student=str(student), precision="", out=str(root / "onnx"),
                       probe_images=4, tar=True)
    export_bundle(cfg, dataset=tiny_dataset())
    return root / "onnx"


def test_layout_and_manifest(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["kind"] == "edge-msd-bundle" and m["schema_version"] == 1
    for rel in ("target.toml", "models/image.onnx", "models/text.onnx", "tokenizer/tokenizer.json",
                "tokenizer/bpe_simple_vocab_16e6.txt.gz", "probe.npz", "evalset.npz"):
        assert rel in m["files"], rel
    assert m["preprocessing"]["size"] == [32, 32] and m["preprocessing"]["color_order"] == "RGB"
    assert m["tokenizer"]["context_length"] == 16
    ev = np.load(bundle / "evalset.npz")
    assert ev["images"].dtype == np.uint8 and ev["images"].shape == (8, 32, 32, 3)
    assert ev["tokens"].dtype == np.int32 and ev["caption_image_index"].dtype == np.int64
    probe = np.load(bundle / "probe.npz")
    assert probe["image_emb"].shape == (4, 32) and len(probe["text_emb"]) == len(probe["tokens"])
    tok = Tokenizer.from_dir(bundle / "tokenizer")
    assert tok([str(t) for t in ev["texts"]]) == ev["tokens"].tolist()
    assert (bundle.parent / "onnx.tar.gz").is_file()


def test_verify_ok_and_flipped_byte(bundle, tmp_path):
    import shutil

    assert verify_bundle(bundle)["kind"] == "edge-msd-bundle"
    assert verify_bundle(bundle.parent / "onnx.tar.gz")["kind"] == "edge-msd-bundle"
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    model = copy / "models" / "text.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="text.onnx: sha256"):
        verify_bundle(copy)
    result = CliRunner().invoke(main, ["bundle", "verify", str(copy)])
    assert result.exit_code == 2 and "text.onnx" in result.output


def test_verify_truncated_tar_and_foreign_file(bundle, tmp_path):
    data = (bundle.parent / "onnx.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        verify_bundle(tmp_path / "cut.tar.gz")
    with tarfile.open(bundle.parent / "onnx.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (tmp_path / "x" / "onnx" / "models" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="extra.bin: not listed"):
        verify_bundle(tmp_path / "x" / "onnx")


def test_cli_targets_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/export/<target>) must not meet a real run's bundle
    runner = CliRunner()
    out = runner.invoke(main, ["targets"])
    assert out.exit_code == 0 and "jetson-orin" in out.output and "tflite" in out.output
    out = runner.invoke(main, ["export", "--target", "pixel", "--student", str(tmp_path)])
    assert out.exit_code == 2 and "known: coreml, jetson" in out.output
    out = runner.invoke(main, ["export", "--target", "onnx", "--student", str(tmp_path / "none")])
    assert out.exit_code == 2 and "student folder not found" in out.output
