"""What upstream stages recorded, so that later stages default to it and never to the demo.

A student folder's manifest (written at the end of ``edge-msd distill``) names its teacher, data spec,
feature-cache root (absolute) and splits; ``calibrate``, ``qat``/``ptq``, ``export`` and ``eval`` take
their defaults from it. Calibration sets live at ``runs/calibration/<data>.json`` (``calibration_path``),
where ``edge-msd calibrate`` writes them and the quantizing verbs look for them; the embedded demo's set
also ships with the package.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_msd import paths
from edge_msd.artifacts import MANIFEST
from edge_msd.errors import ArtifactError, ConfigError

DEMO_DATA = "demo-scenes"
STUDENT_KIND = "student"  # the manifest kind of a student folder
ROLES = ("train", "val", "test")  # the splits a student records, by role

C = TypeVar("C")


@dataclass(frozen=True)
class StudentRecord:
    """What the trainer records about a student in its folder's manifest (all None for a folder
    without one): its data spec, teacher, feature-cache root (absolute) and splits by role."""

    folder: Path
    data: str | None = None
    features: str | None = None
    teacher: str | None = None
    teacher_id: str | None = None
    splits: dict[str, str | None] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest entries of this record (the folder is where the manifest lies, not in it)."""
        return {"data": self.data, "features": self.features, "teacher": self.teacher,
                "teacher_id": self.teacher_id, "splits": {role: self.splits.get(role) for role in ROLES}}

    @classmethod
    def from_manifest(cls, folder: str | Path, manifest: dict[str, Any]) -> StudentRecord:
        """The record a student manifest holds; an entry it lacks (an older edge-msd) is None."""
        splits = manifest.get("splits")
        return cls(Path(folder), data=manifest.get("data"), features=manifest.get("features"),
                   teacher=manifest.get("teacher"), teacher_id=manifest.get("teacher_id"),
                   splits=dict(splits) if isinstance(splits, dict) else {})

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
    if not isinstance(m, dict) or m.get("kind") != STUDENT_KIND:
        raise ArtifactError(f"{path}: kind is {m.get('kind') if isinstance(m, dict) else None!r}, "
                            f"expected {STUDENT_KIND!r} (a folder written by `edge-msd distill`)")
    return StudentRecord.from_manifest(folder, m)


def fill_from_record(cfg: C, record: StudentRecord, *, split_role: str = "test", need_data: bool = True) -> C:
    """``cfg`` (a dataclass config of a later stage) with its unset lineage fields taken from ``record``:
    the one fill step of export, quantization, calibration and eval. Only the fields ``cfg`` has are
    filled: ``data`` (an error when none is given or recorded, unless not ``need_data``), ``split`` (the
    recorded split of ``split_role``), ``features`` (the recorded root, else ``runs/features``) and
    ``calibration`` (where the calibration set of the data is looked for)."""
    data = cfg.data or (record.need_data() if need_data else record.data)  # type: ignore[attr-defined]
    defaults: dict[str, Callable[[], str | None]] = {
        "split": lambda: record.split(split_role, split_role),
        "features": lambda: record.features or str(paths.FEATURES),
        "calibration": lambda: str(calibration_path(data)) if data else None,
    }
    names = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    filled = {name: getattr(cfg, name) or default() for name, default in defaults.items() if name in names}
    return dataclasses.replace(cfg, data=data, **filled)  # type: ignore[type-var]


def data_slug(spec: str) -> str:
    """A file name for a data spec: ``csv:/data/pairs.csv?root=/x`` → ``csv-pairs``."""
    kind, _, rest = spec.split("?", 1)[0].partition(":")
    stem = Path(rest).stem if rest else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}-{stem}" if stem else kind).strip("-.") or "data"


def calibration_out(data: str) -> Path:
    """Where ``edge-msd calibrate`` writes the calibration set of ``data``: runs/calibration/<data>.json."""
    return paths.CALIBRATION / f"{data_slug(data)}.json"


def calibration_path(data: str) -> Path:
    """Where the calibration set of ``data`` is looked for (``qat``/``ptq``/``export``): where ``calibrate``
    writes it; for the demo's data, the shipped set unless one was built there."""
    built = calibration_out(data)
    if data == DEMO_DATA and not built.is_file():
        return paths.demo_calibration()
    return built
