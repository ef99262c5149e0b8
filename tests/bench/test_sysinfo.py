"""edge_msd.bench.sysinfo: thread choice, tegrastats power lines, the peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_msd.bench import sysinfo


def test_threads_default_to_the_usable_cores(monkeypatch):
    monkeypatch.setattr(sysinfo, "usable_cores", lambda: 2)
    c = sysinfo.choose_threads(None, 4)
    assert c["threads"] == 2 and c["profile"] == 4 and c["usable_cores"] == 2 and c["warning"] is None
    assert sysinfo.choose_threads(None, 1)["threads"] == 1
    c = sysinfo.choose_threads(8, 4)
    assert c["threads"] == 8 and "--threads 8 exceeds the 2 usable CPU cores" in c["warning"]
    c = sysinfo.choose_threads(None, None)
    assert c["threads"] is None and c["source"] == "runtime default"


ORIN_LINE = (
    "11-16-2024 10:01:02 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [12%@1510,3%@1510,0%@1510,1%@1510,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 61%@[611] "
    "VIC_FREQ 115 APE 200 cpu@48.2C soc2@46.5C tj@48.2C VDD_IN 6912mW/5440mW "
    "VDD_CPU_GPU_CV 1985mW/1120mW VDD_SOC 1583mW/1410mW"
)


NANO_LINE = (
    "RAM 1783/3964MB (lfb 4x2MB) CPU [9%@1479,5%@1479,3%@1479,2%@1479] GR3D_FREQ 0%@76 "
    "PLL@25C CPU@28C POM_5V_IN 2254/2254 POM_5V_GPU 0/0 POM_5V_CPU 479/479"
)


def test_tegrastats_parser_on_recorded_lines():
    orin = sysinfo.parse_tegrastats(ORIN_LINE)
    assert orin["total_mw"] == 6912 and orin["gpu_load_pct"] == 61 and orin["ram_used_mb"] == 2448
    assert orin["rails_mw"] == {"VDD_IN": 6912, "VDD_CPU_GPU_CV": 1985, "VDD_SOC": 1583}
    nano = sysinfo.parse_tegrastats(NANO_LINE)
    assert nano["total_mw"] == 2254 and nano["rails_mw"]["POM_5V_CPU"] == 479 and nano["gpu_load_pct"] == 0
    assert sysinfo.parse_tegrastats("RAM 1/2MB")["total_mw"] is None
    power = sysinfo.summarise_power([orin, {**orin, "total_mw": 5000}])
    assert power["mean_mw"] == 5956 and power["n_samples"] == 2
    e = sysinfo.energy_per_inference(power, wall_ns=2_000_000_000, n_calls=100, batch=4)
    assert e["mJ_per_batch"] == pytest.approx(5956 * 2 / 100) and e["mJ_per_item"] == pytest.approx(
        5956 * 2 / 400
    )


_PEAK_RSS_PROBE = """
import json, sys
import numpy as np
from edge_msd.bench import sysinfo

def touched():  # 64 MiB of fresh pages: mmapped by the allocator, returned on del
    return np.ones(64 * 1024 * 1024 // 8)

marks = {"start": sysinfo.peak_rss_mb()}
block = touched()
marks["grown"] = sysinfo.peak_rss_mb()
del block
marks["after_free"] = sysinfo.peak_rss_mb()
marks["reset"] = sysinfo.reset_peak_rss()
marks["after_reset"] = sysinfo.peak_rss_mb()
block = touched()
marks["regrown"] = sysinfo.peak_rss_mb()
json.dump(marks, sys.stdout)
"""


def test_peak_rss_resets_and_grows():
    """Measured in a fresh process: here, memory that earlier tests freed but the allocator kept resident
    could back the new block, and the peak would not grow."""
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS_PROBE], capture_output=True, text=True, check=True)
    marks = json.loads(r.stdout)
    assert marks["grown"] >= marks["start"] + 50, marks  # the peak follows a new block
    assert marks["after_free"] >= marks["grown"] - 2, marks  # stays when it is freed: a peak, not the RSS
    if sys.platform.startswith("linux"):  # elsewhere the peak is the whole process's
        assert marks["reset"] and marks["after_reset"] <= marks["grown"] - 50, marks  # down to the RSS now
        assert marks["regrown"] >= marks["after_reset"] + 50, marks  # and the peak since the reset grows
