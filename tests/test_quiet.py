"""A quiet terminal: third-party output (Python and C++) is captured around conversions and runtime loads,
shown under ``-v`` and when the call fails; an export and a bench through the CLI print none of it."""

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import make_tiny_student

from edge_msd.quiet import known_noise_hidden, third_party_output_hidden

# Lines that third-party libraries print during an export or a bench, as they print them.
THIRD_PARTY_NOISE = {
    "litert-torch progress": r"\[(START| DONE)\] (LiteRT-Torch Convert|Write Model to)",
    "litert-torch eval-mode hint": r"Your model is converted in training mode",
    "absl pre-init notice": r"All log messages before absl::InitializeLog\(\) is called",
    "glog/absl line": r"(?m)^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\]",
    "TensorFlow oneDNN notice": r"oneDNN custom operations are on",
    "LiteRT XNNPACK notice": r"INFO: Created TensorFlow Lite XNNPACK delegate",
    "coremltools MIL progress": r"Running MIL \w+ pipeline|Converting PyTorch Frontend ==> MIL Ops",
    "tqdm bar": r"\d+%\|[^|\n]*\| \d+/\d+ \[",
}
DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"


def noise_in(text: str) -> list[str]:
    return [name for name, pattern in THIRD_PARTY_NOISE.items() if re.search(pattern, text)]


def _write_native(text: str, fd: int) -> None:
    """Write as a C++ library does: straight to the file descriptor, past Python's sys.stdout."""
    os.write(fd, text.encode())


def test_native_and_python_output_is_captured(capfd):
    with third_party_output_hidden():
        _write_native("native to stdout\n", 1)
        _write_native("native to stderr\n", 2)
        libc = ctypes.CDLL(None)
        libc.printf(b"buffered by C stdio\n")  # flushed inside the block, not after it
        print("python to stdout")
        print("python to stderr", file=sys.stderr)
        kept = sys.stdout  # a library keeping the stream it was given
    print("ours, after")
    kept.write("kept stream, after\n")
    kept.flush()
    out, err = capfd.readouterr()
    assert out == "ours, after\nkept stream, after\n" and err == ""


def test_captured_output_is_shown_when_the_call_fails(capfd):
    with pytest.raises(RuntimeError, match="conversion failed"), third_party_output_hidden():
        _write_native("converter: unsupported op foo\n", 2)
        raise RuntimeError("conversion failed")
    out, err = capfd.readouterr()
    assert "converter: unsupported op foo" in err and out == ""


def test_verbose_lets_output_through(capfd):
    with known_noise_hidden(hide=False), third_party_output_hidden():
        _write_native("native, verbose\n", 2)
    with known_noise_hidden(hide=True), third_party_output_hidden():  # -v ends with its block
        _write_native("native, quiet\n", 2)
    assert capfd.readouterr().err == "native, verbose\n"


def _cli(cwd: Path, *args: str) -> str:
    """Run ``edge-msd ARGS`` in a fresh process with its real stdout and stderr captured; both, joined."""
    env = {**os.environ, "EDGE_MSD_HOME": str(cwd / ".edge-msd-home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "edge_msd.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"edge-msd {' '.join(args)} → {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_export_and_bench_print_no_third_party_noise(tmp_path):
    """A LiteRT export (litert-torch, MLIR, the interpreter's XNNPACK) and its bench print only edge-msd's
    lines; ``-v`` shows the runtime's, so the patterns are the ones really printed."""
    make_tiny_student(tmp_path / "student")
    out = _cli(tmp_path, "export", "--target", "tflite", "--student", "student", "--data", DATA, "--out", "b")
    assert noise_in(out) == [], out
    assert "bundle digest:" in out and "parity" in out  # edge-msd's own summary is still there
    bench = ("bench", "--bundle", "b", "--iters", "5", "--warmup", "1", "--no-cold", "--no-vendor")
    out = _cli(tmp_path, *bench)
    assert noise_in(out) == [], out
    assert "image tower, batch 1" in out
    assert "LiteRT XNNPACK notice" in noise_in(_cli(tmp_path, "-v", *bench, "--out", "v.json"))
