"""edge_msd.bench.engine: the TensorRT engine build on the device, torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench_helpers import _clean_env, make_bundle

from edge_msd.errors import ConfigError

NO_TORCH = "import sys\nfor m in ('torch', 'open_clip', 'tensorrt'):\n    sys.modules[m] = None\n"


def _jetson_bundle(root: Path) -> Path:
    target = {"name": "jetson-orin", "exporter": "tensorrt", "batch_sizes": [1, 4], "options": {}}
    return make_bundle(root / "jetson", target=target)


def test_build_engine_refuses_another_exporter(bundle):
    from edge_msd.bench.engine import build_engines

    with pytest.raises(ConfigError, match="built for exporter None, not tensorrt"):
        build_engines(bundle)


def test_build_engine_command_needs_no_torch(tmp_path):
    """`edge-msd build-engine` with torch and open_clip unimportable gets as far as TensorRT, which is
    missing here (blocked too, so that the test means the same on a machine that has it)."""
    b = _jetson_bundle(tmp_path)
    code = NO_TORCH + f"from edge_msd.cli import main\nmain(['build-engine', {str(b)!r}])\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: TensorRT is not installed" in r.stderr, r.stderr


@pytest.mark.slow
def test_pyz_builds_engines_without_torch(pyz, tmp_path):
    b = _jetson_bundle(tmp_path)
    env = _clean_env(tmp_path)
    (tmp_path / "poison" / "tensorrt.py").write_text("raise ImportError('no TensorRT here')\n")
    run = [sys.executable, "-S", str(pyz), "build-engine"]
    r = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "--workspace-mib" in r.stdout and "--dla-core" in r.stdout, r.stderr
    r = subprocess.run([*run, str(b), "--precision", "fp16"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 2 and "error: TensorRT is not installed" in r.stderr, r.stderr
    assert not (b / "models" / "image.plan").exists()
