"""Where artifacts go by default, so that every verb finds what the previous one wrote.

``EDGE_MSD_HOME`` (default ``~/.cache/edge-msd``) holds built things reused across projects
(the demo teacher); ``runs/`` under the working folder holds one pipeline's artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("EDGE_MSD_HOME", Path.home() / ".cache" / "edge-msd")).expanduser()


def shipped(folder: str) -> Path:
    """A folder the package ships (``targets``, ``calibration``): inside an installed wheel, else the
    source tree's top-level folder (an editable install or a checkout); see setup.py."""
    package = Path(__file__).resolve().parent
    inside = package / "shipped" / folder
    return inside if inside.is_dir() else package.parent / folder


def demo_calibration() -> Path:
    """The demo's calibration-set manifest (calibration/demo-scenes.json, shipped with the package)."""
    return shipped("calibration") / "demo-scenes.json"


def demo_teacher_dir() -> Path:
    return home() / "teachers" / "demo"


RUNS = Path("runs")
FEATURES = RUNS / "features"  # FEATURES / <split>
DISTILL = RUNS / "distill"  # student/, eval.json, metrics.jsonl, losses.png, checkpoints/
STUDENT_FOLDER = "student"  # where a distill run (DISTILL, a sweep's preset) saves its student
STUDENT = DISTILL / STUDENT_FOLDER  # the student every later verb defaults to
QAT = RUNS / "qat"  # QAT / <target>
CALIBRATION = RUNS / "calibration"  # CALIBRATION / <data>.json  (edge_msd.lineage.calibration_path)
EXPORT = RUNS / "export"  # EXPORT / <target>  (a deploy bundle)
BENCH = RUNS / "bench"  # BENCH / <target>.json
