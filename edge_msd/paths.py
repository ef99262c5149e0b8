"""Where artifacts go by default, so that every verb finds what the previous one wrote.

``EDGE_MSD_HOME`` (default ``~/.cache/edge-msd``) holds built things reused across projects
(the demo teacher); ``runs/`` under the working folder holds one pipeline's artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("EDGE_MSD_HOME", Path.home() / ".cache" / "edge-msd")).expanduser()


def demo_teacher_dir() -> Path:
    return home() / "teachers" / "demo"


RUNS = Path("runs")
FEATURES = RUNS / "features"  # FEATURES / <split>
DISTILL = RUNS / "distill"  # student/, eval.json, metrics.jsonl, losses.png, checkpoints/
QAT = RUNS / "qat"  # QAT / <target>
EXPORT = RUNS / "export"  # EXPORT / <target>  (a deploy bundle)
BENCH = RUNS / "bench"  # BENCH / <target>.json
