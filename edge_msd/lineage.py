"""What upstream stages recorded, so that later stages default to it and never to the demo.

A student folder's manifest (written at the end of ``edge-msd distill``) names its teacher, data spec,
feature-cache root (absolute) and splits; ``calibrate``, ``qat``/``ptq``, ``export`` and ``eval`` take
their defaults from it. Calibration sets live at ``runs/calibration/<data>.json`` (``calibration_path``),
where ``edge-msd calibrate`` writes them and the quantizing verbs look for them; the embedded demo's set
also ships with the package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from edge_msd import paths
from edge_msd.artifacts import MANIFEST
from edge_msd.errors import ArtifactError, ConfigError

DEMO_DATA = "demo-scenes"


@dataclass(frozen=True)
class StudentRecord:
    """The lineage a student folder's manifest records (all None for a folder without one)."""

    folder: Path
    data: str | None = None
    features: str | None = None
    teacher: str | None = None
    teacher_id: str | None = None
    splits: dict[str, str | None] = field(default_factory=dict)

    def need_data(self, option: str = "--data") -> str:
        if not self.data and not self.folder.is_dir():
            raise ArtifactError(f"{self.folder}: student folder not found, so there is no recorded data spec "
                                f"to default to; pass --student DIR or {option} SPEC")
        if not self.data:
            raise ConfigError(
                f"{self.folder / MANIFEST}: the student records no data spec (no manifest, or one from an "
                f"older edge-msd); pass {option} SPEC"
            )
        return self.data

    def split(self, role: str, default: str) -> str:
        return self.splits.get(role) or default


def read_student_record(folder: str | Path) -> StudentRecord:
    """The lineage of the student at ``folder``; a missing folder or manifest records nothing."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return StudentRecord(folder)
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable JSON manifest ({e})") from e
    if not isinstance(m, dict) or m.get("kind") != "student":
        raise ArtifactError(f"{path}: kind is {m.get('kind') if isinstance(m, dict) else None!r}, "
                            "expected 'student' (a folder written by `edge-msd distill`)")
    splits = m.get("splits") if isinstance(m.get("splits"), dict) else {}
    return StudentRecord(folder, data=m.get("data"), features=m.get("features"), teacher=m.get("teacher"),
                         teacher_id=m.get("teacher_id"), splits=splits)


def data_slug(spec: str) -> str:
    """A file name for a data spec: ``csv:/data/pairs.csv?root=/x`` → ``csv-pairs``."""
    kind, _, rest = spec.split("?", 1)[0].partition(":")
    stem = Path(rest).stem if rest else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}-{stem}" if stem else kind).strip("-.") or "data"


def calibration_path(data: str) -> Path:
    """Where the calibration set of ``data`` is written (``calibrate``) and looked for (``qat``/``ptq``/
    ``export``): ``runs/calibration/<data>.json``; for the demo's data, the shipped set unless one was
    built there."""
    built = paths.CALIBRATION / f"{data_slug(data)}.json"
    if data == DEMO_DATA and not built.is_file():
        return paths.demo_calibration()
    return built
