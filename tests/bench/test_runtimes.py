"""edge_msd.bench.runtimes: choosing the runtime for a bundle's files, and what is installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_msd.bench import runtimes
from edge_msd.contract.reading import open_bundle
from edge_msd.errors import ConfigError


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
