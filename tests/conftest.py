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


# Module-scoped fixtures shared by the export, quant, family and bench modules (one instance per module).
@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from export_helpers import make_tiny_student

    return make_tiny_student(tmp_path_factory.mktemp("s") / "student")


@pytest.fixture(scope="module")
def student(student_dir):
    from edge_msd.students.towers import load_student_towers

    return load_student_towers(student_dir)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    from export_helpers import DATA

    from edge_msd.data import open_dataset
    from edge_msd.quant.calibration import build_calibration_set, save_calibration_set

    cs = build_calibration_set(open_dataset(DATA, "train"), 32)
    return save_calibration_set(cs, tmp_path_factory.mktemp("cal") / "cal.json")


@pytest.fixture(scope="module")
def towers():
    """The tiny student's image and text towers, random weights (seed 0), for the quantizer tests."""
    import open_clip
    import torch
    from export_helpers import TINY_CFG

    from edge_msd.students.towers import ImageTower, TextTower

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CFG).eval()
    return ImageTower(model).eval(), TextTower(model).eval()


@pytest.fixture(scope="module")
def batches():
    """Two batches of 8 random images and 8 token rows (start, 8 tokens, end, padding) for calibration."""
    import torch

    g = torch.Generator().manual_seed(1)
    images = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    tokens = []
    for _ in range(2):
        t = torch.randint(1, 49000, (8, 16), generator=g, dtype=torch.int32)
        t[:, 0], t[:, 9], t[:, 10:] = 49406, 49407, 0
        tokens.append(t)
    return images, tokens


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The bench tests' tiny ONNX bundle (bench_helpers.make_bundle); tests/export has its own real one."""
    from bench_helpers import make_bundle

    return make_bundle(tmp_path_factory.mktemp("bundle") / "onnx")
