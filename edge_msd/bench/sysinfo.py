"""What the run happened on (CPU, cores, OS, power mode), memory, and Jetson power from tegrastats.

Standard library only (+ numpy's version): ships inside the benchmark binary.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m:
            return m.group(1).strip()
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    return platform.processor() or platform.machine()


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists() or "tegra" in (_read("/proc/device-tree/compatible") or "")


def jetson_info() -> dict[str, Any] | None:
    """Board, L4T release and nvpmodel power mode; None elsewhere."""
    if not is_jetson():
        return None
    mode = _run(["nvpmodel", "-q"])
    m = re.search(r"NV Power Mode:\s*(\S+)", mode or "")
    return {
        "board": _read("/proc/device-tree/model"),
        "l4t": (_read("/etc/nv_tegra_release") or "").split(",")[0],
        "power_mode": m.group(1) if m else None,
        "nvpmodel": mode,
    }


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def choose_threads(requested: int | None, profile: int | None) -> dict[str, Any]:
    """The runtime's thread count and why: ``--threads`` as given (a warning when it exceeds the usable
    cores: oversubscribed runtimes can be orders of magnitude slower), else the profile's capped at the
    usable cores, else the runtime's default (``threads`` None)."""
    cores = usable_cores()
    choice: dict[str, Any] = {
        "threads": requested,
        "source": "--threads",
        "profile": profile,
        "usable_cores": cores,
        "warning": None,
    }
    if requested is not None:
        if requested > cores:
            choice["warning"] = (
                f"--threads {requested} exceeds the {cores} usable CPU cores: "
                "latency may be far worse than with fewer threads"
            )
    elif profile:
        choice.update(threads=min(profile, cores), source="profile, capped at the usable cores")
    else:
        choice["source"] = "runtime default"
    return choice


def environment(runtime_versions: dict[str, str], threads: int | None) -> dict[str, Any]:
    usable = usable_cores()
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "threads": threads or "runtime default",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "runtimes": runtime_versions,
        "device_model": _read("/proc/device-tree/model"),
        "jetson": jetson_info(),
    }


# ---- memory --------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    m = re.search(rf"^{field}:\s*(\d+) kB", _read("/proc/self/status") or "", re.MULTILINE)
    return int(m.group(1)) if m else None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0) so that a peak belongs to one measurement."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size: since the last reset on Linux, of the whole process elsewhere."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS


# ---- Jetson power (tegrastats) --------------------------------------------------------------

# Orin: "VDD_IN 5012mW/5012mW"; Xavier/Nano: "POM_5V_IN 2254/2254" or "VDD_IN 2254/2254" (mW, now/avg).
_RAIL = re.compile(r"\b((?:VDD|POM|VIN)_[A-Z0-9_]+)\s+(\d+)(?:mW)?/(\d+)(?:mW)?")
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line → rails (instant mW), total power (mW), GPU load (%), RAM used (MB)."""
    rails = {name: int(now) for name, now, _avg in _RAIL.findall(line)}
    total = next((rails[r] for r in _TOTAL_RAILS if r in rails), None)
    if total is None and rails:
        total = sum(rails.values())  # no input rail: the sum of the module rails
    gpu = re.search(r"GR3D_FREQ (\d+)%", line)
    ram = re.search(r"RAM (\d+)/(\d+)MB", line)
    return {
        "rails_mw": rails,
        "total_mw": total,
        "gpu_load_pct": int(gpu.group(1)) if gpu else None,
        "ram_used_mb": int(ram.group(1)) if ram else None,
    }


class PowerSampler:
    """Runs ``tegrastats --interval MS`` during a measurement; ``stop()`` gives mean power."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = interval_ms
        self.samples: list[dict[str, Any]] = []
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("tegrastats") is not None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["tegrastats", "--interval", str(self.interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parsed = parse_tegrastats(line)
            if parsed["total_mw"] is not None:
                parsed["t"] = time.monotonic()
                self.samples.append(parsed)

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.thread is not None:
            self.thread.join(timeout=2)
        return summarise_power(self.samples)


def summarise_power(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not samples:
        return None
    totals = [s["total_mw"] for s in samples]
    rails = sorted({r for s in samples for r in s["rails_mw"]})
    return {
        "source": "tegrastats",
        "n_samples": len(samples),
        "mean_mw": float(np.mean(totals)),
        "max_mw": float(np.max(totals)),
        "rails_mean_mw": {r: float(np.mean([s["rails_mw"].get(r, 0) for s in samples])) for r in rails},
        "gpu_load_mean_pct": (
            float(np.mean([s["gpu_load_pct"] for s in samples]))
            if all(s["gpu_load_pct"] is not None for s in samples)
            else None
        ),
    }


def energy_per_inference(power: dict[str, Any] | None, wall_ns: int, n_calls: int, batch: int) -> dict | None:
    """Mean power × steady-state time / calls: millijoules per call and per item."""
    if not power or not n_calls or not wall_ns:
        return None
    mj_per_call = power["mean_mw"] * (wall_ns / 1e9) / n_calls
    return {"mJ_per_batch": mj_per_call, "mJ_per_item": mj_per_call / batch}
