"""tools/arm64_check.py without emulation: which runs a bundle gets, the host vs aarch64 verdicts, and
"not run" (never "passed") when a prerequisite is missing. The emulated run itself: docs/arm64.md."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("arm64_check", ROOT / "tools" / "arm64_check.py")
arm = importlib.util.module_from_spec(spec)
sys.modules["arm64_check"] = arm  # dataclasses look their module up there
spec.loader.exec_module(arm)


def bundle(folder: Path, suffix: str, precision: str) -> Path:
    folder.mkdir(parents=True)
    manifest = {
        "models": {"image": {"file": f"models/image{suffix}", "precision": precision}},
        "target": {"parity": {"int8": {"min_cos": 0.95}}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def report(r1: float = 80.0, min_cos: float = 0.999, precision: str = "int8") -> dict:
    side = {"R@1": r1, "R@5": 95.0, "R@10": 99.0}
    return {
        "partial": False,
        "bundle": {"models": {"image": {"precision": precision}}},
        "recall": {"eval": {"i2t": dict(side), "t2i": dict(side), "mean_R@1": r1}},
        "parity": {t: {"min_cos": min_cos, "mean_cos": 0.9995} for t in ("image", "text")},
    }


def test_full_and_reduced_plans(tmp_path):
    fp32 = bundle(tmp_path / "tflite", ".tflite", "fp32")
    int8 = bundle(tmp_path / "tflite-int8", ".tflite", "int8")
    onnx = bundle(tmp_path / "onnx", ".onnx", "fp32")
    full = [(c.bundle.name, c.venv, c.exact) for c in arm.plan([fp32, int8, onnx], reduced=False)]
    assert full == [
        ("tflite", "litert", True),
        ("tflite-int8", "litert", True),
        ("tflite-int8", "tflite-runtime", False),
        ("onnx", "onnxruntime", True),
    ]
    reduced = [(c.bundle.name, c.venv) for c in arm.plan([fp32, int8, onnx], reduced=True)]
    assert reduced == [("tflite-int8", "litert"), ("onnx", "onnxruntime")]
    with pytest.raises(arm.BadInput, match="reduced form runs int8 LiteRT and fp32 ONNX"):
        arm.plan([fp32], reduced=True)


def test_same_kernels_must_match_exactly(tmp_path):
    c = arm.Check(tmp_path, "litert", "litert", True)
    manifest = {"target": {"parity": {"int8": {"min_cos": 0.95}}}}
    assert arm.compare(c, report(), report(), manifest) == []
    off = report()
    off["recall"]["eval"]["t2i"]["R@5"] = 94.9
    off["parity"]["image"]["min_cos"] = 0.99898
    assert arm.compare(c, report(), off, manifest) == [
        "t2i R@5 95.00 → 94.90",
        "image min cos 0.999000 → 0.998980 (more than 1e-5)",
    ]


def test_other_kernels_within_half_a_point_and_the_targets_parity(tmp_path):
    c = arm.Check(tmp_path, "tflite-runtime", "litert", False)
    manifest = {"target": {"parity": {"int8": {"min_cos": 0.95}}}}
    assert arm.compare(c, report(80.0), report(79.6, 0.96), manifest) == []
    problems = arm.compare(c, report(80.0), report(79.4, 0.94), manifest)
    assert problems[0] == "mean R@1 80.00 → 79.40 (more than 0.5 pt)"
    assert "image min cos 0.94000 below the target's 0.95 (int8)" in problems
    partial = copy.deepcopy(report())
    partial.update(partial=True, interrupted="time limit")
    assert "aarch64 report is partial (time limit)" in arm.compare(c, report(), partial, manifest)


def test_without_root_the_check_is_not_run(tmp_path, monkeypatch, capsys):
    b = bundle(tmp_path / "onnx", ".onnx", "fp32")
    monkeypatch.setattr(arm.os, "geteuid", lambda: 1000)
    assert arm.main([str(b)]) == arm.EXIT_NOT_RUN
    assert (
        capsys.readouterr().err.strip()
        == "arm64 check not run: needs root (mount, chroot, apt-get); run it with sudo"
    )


def test_without_binfmt_the_check_is_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr(arm, "BINFMT", tmp_path / "binfmt_misc")
    monkeypatch.setattr(
        arm, "sh", lambda cmd, **kw: arm.subprocess.CompletedProcess(cmd, 32, "", "permission denied")
    )
    with pytest.raises(
        arm.NotRun,
        match=r"^no binfmt_misc: .*binfmt_misc is not mounted and mounting it failed "
        r"\(permission denied\)",
    ):
        arm.ensure_binfmt("/usr/bin/qemu-aarch64-static")


def test_not_a_bundle_is_bad_input(tmp_path, capsys):
    assert arm.main([str(tmp_path)]) == arm.EXIT_USAGE
    assert "not a bundle (no manifest.json)" in capsys.readouterr().err
