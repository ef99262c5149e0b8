"""edge_msd.bench.__main__: the .pyz binary, run with python -S in a clean environment without torch."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from bench_helpers import _clean_env, make_bundle

from edge_msd.bench.report import load_report


@pytest.mark.slow
def test_pyz_help_and_contents(pyz, tmp_path):
    import zipfile

    names = set(zipfile.ZipFile(pyz).namelist())
    assert {
        "__main__.py",
        "edge_msd/__init__.py",
        "edge_msd/bench/run.py",
        "edge_msd/bench/engine.py",
        "edge_msd/eval/retrieval.py",
        *(f"edge_msd/contract/{m}.py" for m in ("__init__", "format", "integrity", "signing", "reading",
                                                  "numerics")),
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
    assert "--eval-limit" in r.stdout  # the binary takes every option of `edge-msd bench`


@pytest.mark.slow
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
    cold = report["towers"]["image"]["cold"]  # the fresh child process ran from the .pyz too
    assert cold["available"] and cold["torch_imported"] is False and cold["footprint_mb"] > 0, cold


@pytest.mark.slow
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


@pytest.mark.slow
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
