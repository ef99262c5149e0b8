"""Shared test settings: keep torch to one thread (CI has 2 cores) and runs offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the bench tests run without torch
    pass


def pytest_report_header(config):
    import edge_msd

    return f"edge_msd imported from {edge_msd.__file__}"  # CI: the installed package, not the checkout


# One build for the session: the bench, bundle and TensorRT tests all run the same binary.
@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pyz") / "edge-msd-bench.pyz"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_bench.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out
