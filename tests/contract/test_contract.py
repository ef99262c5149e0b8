"""The bundle contract (edge_msd.contract): its format constants, the numerics host and device share, its
path rules and signatures, and that it imports without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edge_msd.contract import format as fmt
from edge_msd.contract.integrity import confined, device_added, parse_digest
from edge_msd.contract.numerics import dequantize, quantize, row_cosine, run_batched
from edge_msd.contract.reading import preprocess_images
from edge_msd.errors import ArtifactError, ConfigError

# ---- numerics -------------------------------------------------------------------------------


def test_quantize_rounds_offsets_and_clips_to_the_dtype():
    x = np.array([[0.0, 1.0, 1.3, -100.0, 100.0]], np.float32)
    q = quantize(x, 0.5, -3)
    assert q.dtype == np.int8 and q.tolist() == [[-3, -1, 0, -128, 127]]  # round(x / 0.5) - 3, clipped
    assert quantize(x, 0.5, 10, np.uint8).tolist() == [[10, 12, 13, 0, 210]]
    np.testing.assert_allclose(dequantize(q, 0.5, -3), [[0.0, 1.0, 1.5, -62.5, 65.0]])
    assert dequantize(q, 0.5, -3).dtype == np.float32


def test_quantize_dequantize_is_within_half_a_step():
    x = np.random.default_rng(0).uniform(-1, 1, size=(64, 8)).astype(np.float32)
    scale = 2 / 255
    err = np.abs(dequantize(quantize(x, scale, 0), scale, 0) - x)
    assert err.max() <= scale / 2 + 1e-7


def test_run_batched_pads_the_last_chunk_and_cuts_its_outputs():
    seen = []

    def model(chunk: np.ndarray) -> np.ndarray:
        seen.append(chunk.copy())
        return chunk * 2

    x = np.arange(7, dtype=np.float32).reshape(7, 1)
    np.testing.assert_array_equal(run_batched(model, x, 3), x * 2)
    assert [len(c) for c in seen] == [3, 3, 3] and seen[-1].ravel().tolist() == [6, 6, 6]  # last row repeated
    seen.clear()
    np.testing.assert_array_equal(run_batched(model, x, 0), x * 2)  # dynamic batch: one call
    assert len(seen) == 1


def test_row_cosine_per_row_and_zero_rows():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], np.float32)
    b = np.array([[3.0, 0.0], [1.0, 1.0], [1.0, 0.0]], np.float32)
    np.testing.assert_allclose(row_cosine(a, b), [1.0, np.sqrt(0.5), 0.0], atol=1e-6)


def test_host_and_device_share_one_implementation():
    """Export parity, the families' runners and bench use the contract's numerics, not copies."""
    from edge_msd.bench import raw, run
    from edge_msd.bench.runtimes import litert
    from edge_msd.contract.numerics import cosine_summary
    from edge_msd.export import parity

    assert parity.row_cosine is row_cosine and run.run_batched is run_batched
    assert run.cosine_summary is raw.cosine_summary is cosine_summary  # over row_cosine
    assert litert.quantize is quantize and litert.dequantize is dequantize
    pytest.importorskip("torch")
    from edge_msd.families import onnx, tflite

    assert onnx.run_batched is tflite.run_batched is run_batched and tflite.quantize is quantize


def test_model_input_quantizes_int8_images_as_the_contract_says():
    pytest.importorskip("torch")
    from edge_msd.families.tflite import model_input

    detail = {"shape": [2, 4, 4, 3], "dtype": np.int8, "quantization": (0.02, 5)}
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(model_input(detail, x), quantize(x.transpose(0, 2, 3, 1), 0.02, 5))


# ---- format ---------------------------------------------------------------------------------


def test_runtimes_are_the_bench_backends_and_cover_every_family():
    from edge_msd.bench.options import BenchOptions
    from edge_msd.bench.runtimes import BACKENDS

    assert tuple(BACKENDS) == fmt.RUNTIMES
    help_text = BenchOptions.__dataclass_fields__["runtime"].metadata["help"]
    assert help_text.startswith("auto | tensorrt | coreml | litert | executorch | onnxruntime ")
    pytest.importorskip("torch")
    from edge_msd.families import family, names

    for name in names():
        assert set(family(name).runtimes) <= set(fmt.RUNTIMES), name


def test_each_family_takes_its_facts_from_its_own_declaration():
    """What the profile loader checks (torch-free) is what the family object uses, for every family."""
    pytest.importorskip("torch")
    from edge_msd.families import declaration, family, names

    for name in names():
        fam = family(name)
        assert fam.declaration is declaration(name) and fam.name == name, name
        assert (fam.recipe is None) == (fam.quantizer is None), name  # int8 needs both


def test_file_names_and_the_device_added_files():
    assert fmt.model_file("text", "tflite") == "models/text.tflite"
    assert fmt.engine_file("image") == "models/image.plan"
    manifest = {"models": {"image": {"engine": {"file": "models/i.plan"}}, "text": {}},
                "target": {"options": {"timing_cache": "cache/t.bin"}}}
    assert fmt.timing_cache_file(manifest) == "cache/t.bin"
    assert fmt.timing_cache_file({"target": "not a table"}) == fmt.DEFAULT_TIMING_CACHE
    assert device_added(manifest) == {"manifest.sig", "engines.json", "cache/t.bin", "models/image.plan",
                                      "models/text.plan", "models/i.plan"}


# ---- rules ----------------------------------------------------------------------------------


def test_confined_paths_and_digests(tmp_path):
    assert confined(tmp_path, "models/a.onnx", "f") == tmp_path / "models/a.onnx"
    refused = [("/etc/passwd", "is absolute"), ("a/../../x", "leaves the bundle"), ("", "must be a path"),
               ("C:x", "is absolute"), ("a\\b", "is absolute")]
    for bad, match in refused:
        with pytest.raises(ArtifactError, match=f"manifest.json: field .*{match}"):
            confined(tmp_path, bad, "field")
    assert parse_digest(" " + "AB" * 32 + "\n") == "ab" * 32
    with pytest.raises(ConfigError, match="--expect-digest: expected the 64 hex digits"):
        parse_digest("abc")


def test_sign_and_verify_a_digest(tmp_path):
    pytest.importorskip("cryptography")
    from edge_msd.contract.signing import generate_keys, verify_signature, write_signature

    kid = generate_keys(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    digest = "0" * 64
    sig = write_signature(tmp_path / "manifest.sig", digest, tmp_path / "k.pem")
    assert sig["key_id"] == kid and len(kid) == 16
    assert verify_signature(tmp_path / "manifest.sig", digest, tmp_path / "k.pub.pem")["key_id"] == kid
    with pytest.raises(ArtifactError, match="the manifest was changed after signing"):
        verify_signature(tmp_path / "manifest.sig", "1" * 64, tmp_path / "k.pub.pem")
    with pytest.raises(ConfigError, match="already exists"):
        generate_keys(tmp_path / "k.pem", tmp_path / "other.pub.pem")


# ---- reading --------------------------------------------------------------------------------


def test_preprocess_images_formula_and_layouts():
    images = np.full((1, 2, 2, 3), 255, np.uint8)
    pre = {"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    x = preprocess_images(images, pre)
    assert x.shape == (1, 3, 2, 2) and x[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5])
    assert preprocess_images(images, pre, "NHWC").shape == (1, 2, 2, 3)
    with pytest.raises(ArtifactError, match="unknown image layout 'CHW'"):
        preprocess_images(images, pre, "CHW")


def test_the_contract_imports_without_torch():
    code = ("import sys\nfor m in ('torch', 'open_clip', 'click', 'rich'):\n    sys.modules[m] = None\n"
            "import edge_msd.contract.format, edge_msd.contract.integrity, edge_msd.contract.signing\n"
            "import edge_msd.contract.reading, edge_msd.contract.numerics, edge_msd.bench.engine\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # an import of any blocked module raises ImportError
