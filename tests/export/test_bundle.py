"""Bundle layout per docs/bundle.md; the one rule set that `bundle verify` and `bench` (and the .pyz)
apply: flipped bytes, truncation, paths leaving the bundle, unlisted files; digest and signatures."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import _clean_env
from click.testing import CliRunner
from export_helpers import make_tiny_student, tiny_dataset

from edge_msd.artifacts import atomic_write_json, sha256_file
from edge_msd.bench.options import BenchOptions
from edge_msd.bench.run import run_bench
from edge_msd.bench.tokenizer import Tokenizer
from edge_msd.cli import main
from edge_msd.contract.integrity import bundle_digest
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.export.bundle import ExportConfig, export_bundle, sign_bundle, verify_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("b")
    student = make_tiny_student(root / "student")
    cfg = ExportConfig(target="onnx", student=str(student), precision="", out=str(root / "onnx"),
                       probe_images=4, tar=True)
    export_bundle(cfg, dataset=tiny_dataset())
    return root / "onnx"


@pytest.mark.slow
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


@pytest.mark.slow
def test_verify_ok_and_flipped_byte(bundle, tmp_path):
    assert verify_bundle(bundle).manifest["kind"] == "edge-msd-bundle"
    assert verify_bundle(bundle.parent / "onnx.tar.gz").digest == verify_bundle(bundle).digest
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


@pytest.mark.slow
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
    assert out.exit_code == 2 and "known: coreml, executorch, executorch-coreml, jetson" in out.output
    out = runner.invoke(main, ["export", "--target", "onnx", "--student", str(tmp_path / "none")])
    assert out.exit_code == 2 and "student folder not found" in out.output


# ---- one rule set for `bundle verify` and `bench` -------------------------------------------


def _copy(bundle: Path, tmp_path: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of the bundle, its manifest changed by ``edit``."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    if edit is not None:
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest)
        atomic_write_json(copy / "manifest.json", manifest)
    return copy


def _bench(path: Path, tmp_path: Path, **kw) -> dict:
    return run_bench(BenchOptions(bundle=str(path), out=str(tmp_path / "r.json"), towers=["image"], batch=[1],
                                  iters=1, warmup=0, pool=1, recall=False, **kw), echo=lambda s: None)


def _refused_by_both(path: Path, tmp_path: Path, match: str, **kw) -> None:
    """`bundle verify` and `bench` refuse the bundle with the same message; bench writes no report."""
    with pytest.raises(ArtifactError, match=match):
        verify_bundle(path, **kw)
    with pytest.raises(ArtifactError, match=match):
        _bench(path, tmp_path, **kw)
    assert not (tmp_path / "r.json").exists()


def _set(path: str, value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *keys, last = path.split(".")
        for k in keys:
            m = m[k]
        m[last] = value
    return edit


@pytest.mark.slow
@pytest.mark.parametrize("field, value, match", [
    ("models.image.file", "/etc/passwd", "models.image.file '/etc/passwd' is absolute"),
    ("models.image.file", "../outside.onnx", r"'../outside.onnx' leaves the bundle \('..'\)"),
    ("models.text.engine", {"file": "models/../../x.plan"}, "models.text.engine.file .* leaves the bundle"),
    ("models.text.engine", "x.plan", "models.text.engine.file must be a path relative to the bundle"),
    ("target", ["not", "a", "table"], "'target' must be a table, got list"),
    ("tokenizer.dir", "../../tokenizer", "tokenizer.dir .* leaves the bundle"),
    ("target.options", {"timing_cache": "/tmp/timing.cache"}, "target.options.timing_cache .* is absolute"),
    ("models.image.file", "evalset.npz/x", "models.image.file 'evalset.npz/x' is not among the files"),
    ("schema_version", 2, "schema_version 2"),
    ("models", {}, "'models' is missing, empty"),
])
def test_paths_leaving_the_bundle_refused_by_both(bundle, tmp_path, field, value, match):
    _refused_by_both(_copy(bundle, tmp_path, _set(field, value)), tmp_path, match)


@pytest.mark.slow
def test_listed_path_through_a_symlink_out_refused(bundle, tmp_path):
    """A model swapped for a link to a file outside, its hash updated to match: still refused."""
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(bundle / "models" / "image.onnx", outside)
    copy = _copy(bundle, tmp_path)
    (copy / "models" / "image.onnx").unlink()
    (copy / "models" / "image.onnx").symlink_to(outside)
    _refused_by_both(copy, tmp_path, "leads outside the bundle through a symbolic link")


@pytest.mark.slow
def test_unlisted_file_refused_by_both_device_files_allowed(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    for rel in ("models/image.plan", "models/text.plan", "engines.json", "timing.cache", "manifest.sig"):
        (copy / rel).write_bytes(b"built on the device")
    assert verify_bundle(copy).digest == verify_bundle(bundle).digest
    assert _bench(copy, tmp_path)["bundle"]["digest"] == verify_bundle(bundle).digest
    (tmp_path / "r.json").unlink()
    (copy / "models" / "other.plan").write_bytes(b"x")
    _refused_by_both(copy, tmp_path, r"models/other\.plan: not listed in manifest.json")
    (copy / "models" / "other.plan").unlink()
    (copy / "link").symlink_to(tmp_path)
    _refused_by_both(copy, tmp_path, "link: symbolic link leading outside the bundle")


# ---- digest ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_digest_printed_checked_and_recorded(bundle, tmp_path):
    digest = verify_bundle(bundle).digest
    manifest = json.loads((bundle / "manifest.json").read_text())
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert digest == bundle_digest(manifest) == hashlib.sha256(canonical).hexdigest()
    out = CliRunner().invoke(main, ["bundle", "verify", str(bundle), "--expect-digest", digest.upper()])
    assert out.exit_code == 0 and f"digest: {digest}" in out.output
    report = _bench(bundle, tmp_path, expect_digest=digest)
    assert report["bundle"]["digest"] == digest and report["bundle"]["signature"] is None
    with pytest.raises(ConfigError, match="--expect-digest: expected the 64 hex digits"):
        verify_bundle(bundle, expect_digest="abc")


@pytest.mark.slow
def test_edited_manifest_changes_the_digest(bundle, tmp_path):
    """Edits that keep every sha256 consistent are caught by --expect-digest only: a changed mean, and a
    changed model whose hash was updated to match."""
    digest = verify_bundle(bundle).digest
    mean = _copy(bundle, tmp_path / "mean", _set("preprocessing.mean", [0.5, 0.5, 0.5]))
    assert verify_bundle(mean).digest != digest  # consistent, but another bundle
    _refused_by_both(mean, tmp_path / "mean", "bundle digest .* differs from the expected",
                     expect_digest=digest)

    def swap_model(m: dict) -> None:
        with open(tmp_path / "model" / "copy" / "models" / "text.onnx", "ab") as f:
            f.write(b"\0")
        m["files"]["models/text.onnx"] = sha256_file(tmp_path / "model" / "copy" / "models" / "text.onnx")

    model = _copy(bundle, tmp_path / "model", swap_model)
    assert verify_bundle(model).digest != digest
    _refused_by_both(model, tmp_path / "model", "differs from the expected", expect_digest=digest)
    out = CliRunner().invoke(main, ["bundle", "verify", str(model), "--expect-digest", digest])
    assert out.exit_code == 2 and "differs from the expected" in out.output


# ---- signatures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    runner = CliRunner()
    for name in ("alice", "mallory"):
        out = runner.invoke(main, ["bundle", "keygen", str(d / f"{name}.pem")])
        assert out.exit_code == 0, out.output
    assert (d / "alice.pem").stat().st_mode & 0o077 == 0  # the private key is its owner's only
    return {"private": d / "alice.pem", "public": d / "alice.pub.pem", "other": d / "mallory.pub.pem"}


@pytest.mark.slow
def test_sign_then_verify_with_the_public_key(bundle, tmp_path, keys):
    copy = _copy(bundle, tmp_path)
    pack = copy.with_name("copy.tar.gz")
    shutil.copyfile(bundle.parent / "onnx.tar.gz", pack)
    out = CliRunner().invoke(main, ["bundle", "sign", str(copy), "--key", str(keys["private"])])
    assert out.exit_code == 0 and "signed:" in out.output, out.output
    out = CliRunner().invoke(main, ["bundle", "verify", str(copy), "--public-key", str(keys["public"])])
    assert out.exit_code == 0 and "signature: ed25519" in out.output and "verified" in out.output
    assert verify_bundle(pack, public_key=str(keys["public"])).signature  # the tar.gz was re-packed, signed
    report = _bench(copy, tmp_path, public_key=str(keys["public"]))
    assert report["bundle"]["signature"]["digest"] == report["bundle"]["digest"]
    (tmp_path / "r.json").unlink()
    _refused_by_both(copy, tmp_path, "signed with key .* wrong public key", public_key=str(keys["other"]))


@pytest.mark.slow
def test_bad_or_missing_signature_refused(bundle, tmp_path, keys):
    copy = _copy(bundle, tmp_path)
    _refused_by_both(copy, tmp_path, "manifest.sig: missing; the bundle is not signed",
                     public_key=str(keys["public"]))
    sign_bundle(copy, keys["private"])
    sig = json.loads((copy / "manifest.sig").read_text())
    forged = bytearray(base64.b64decode(sig["signature"]))
    forged[0] ^= 1
    atomic_write_json(copy / "manifest.sig", {**sig, "signature": base64.b64encode(forged).decode()})
    _refused_by_both(copy, tmp_path, "signature does not verify", public_key=str(keys["public"]))
    sign_bundle(copy, keys["private"])
    manifest = json.loads((copy / "manifest.json").read_text())
    _set("preprocessing.mean", [0.0, 0.0, 0.0])(manifest)
    atomic_write_json(copy / "manifest.json", manifest)
    _refused_by_both(copy, tmp_path, "the manifest was changed after signing", public_key=str(keys["public"]))
    with pytest.raises(ConfigError, match="not an unencrypted PEM public key"):
        verify_bundle(copy, public_key=str(copy / "target.toml"))


@pytest.mark.slow
def test_pyz_checks_digest_and_needs_cryptography_only_for_a_key(pyz, bundle, tmp_path, keys):
    """The benchmark binary applies --expect-digest; with --public-key and no `cryptography` it says what
    to install."""
    env = _clean_env(tmp_path)
    (tmp_path / "poison" / "cryptography.py").write_text("raise ImportError('no cryptography here')\n")
    base = [sys.executable, "-S", str(pyz), "--bundle", str(bundle), "--out", str(tmp_path / "r.json")]
    r = subprocess.run([*base, "--expect-digest", "0" * 64], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "differs from the expected" in r.stderr
    r = subprocess.run([*base, "--public-key", str(keys["public"])], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "pip install cryptography" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "r.json")
