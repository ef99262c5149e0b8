"""The installed package finds its target profiles and the demo calibration set from any folder, and a
user's own profiles still win. Runs against whatever pytest imports: the installed wheel in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge_msd
from edge_msd import paths
from edge_msd.targets import known_targets, load_target

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"targets": "*.toml", "calibration": "*.json"}


@pytest.mark.parametrize("folder", list(SHIPPED))
def test_shipped_files_equal_the_edited_ones(folder):
    """An installed wheel carries copies of targets/ and calibration/; they must be the current ones."""
    edited = {p.name: p.read_bytes() for p in (REPO / folder).glob(SHIPPED[folder])}
    shipped = {p.name: p.read_bytes() for p in paths.shipped(folder).glob(SHIPPED[folder])}
    assert edited and shipped == edited, f"{paths.shipped(folder)} differs from {REPO / folder}: reinstall"


def test_profiles_and_demo_calibration_from_an_empty_folder(tmp_path, monkeypatch):
    from edge_msd.quant.calibration import load_calibration_set

    monkeypatch.chdir(tmp_path)
    assert {"onnx", "tflite", "jetson", "coreml"} <= set(known_targets())
    assert Path(load_target("tflite").source).parent == paths.shipped("targets")
    assert load_calibration_set(paths.demo_calibration()).dataset == "demo-scenes"
    # a user's own profiles: ./targets/<name>.toml by name (it wins over a shipped one), or any path
    (tmp_path / "targets").mkdir()
    shipped = (paths.shipped("targets") / "onnx.toml").read_text().splitlines(True)
    mine = 'description = "mine"\n' + "".join(ln for ln in shipped if not ln.startswith("description"))
    (tmp_path / "targets" / "onnx.toml").write_text(mine)
    (tmp_path / "my-device.toml").write_text(mine)
    assert load_target("onnx").description == "mine" and load_target("tflite").description != "mine"
    assert load_target("./my-device.toml").name == "my-device"


def test_console_script_runs_outside_the_checkout(tmp_path):
    script = Path(sys.executable).with_name("edge-msd")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "edge_msd.cli"]
    env = {**os.environ, "EDGE_MSD_HOME": str(tmp_path / "home")}
    r = subprocess.run([*cmd, "targets"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "jetson-orin" in r.stdout and "tflite" in r.stdout, r.stderr
    where = subprocess.run([sys.executable, "-c", "import edge_msd; print(edge_msd.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60).stdout.strip()
    assert where == edge_msd.__file__  # the subprocess and pytest test the same installed package
