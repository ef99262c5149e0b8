"""The config of ``edge-msd qat`` / ``edge-msd ptq`` (no torch import: the CLI builds its options from it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edge_msd import paths
from edge_msd.config import field
from edge_msd.errors import ConfigError
from edge_msd.lineage import calibration_out, fill_from_record, read_student_record
from edge_msd.teachers.features_config import feature_split_dir

MIN_SAMPLES = 32  # below this the activation ranges of a per-tensor int8 model are noise


@dataclasses.dataclass
class QuantConfig:
    """``edge-msd qat`` / ``edge-msd ptq``: quantize a distilled student for one target."""

    target: str = field("tflite", help="target profile (targets/<name>.toml) whose recipe to use")
    method: str = field("qat", help="qat (fine-tune with fake quantization) or ptq (calibration only)")
    student: str = field(str(paths.STUDENT), help="distilled student folder")
    calibration: str | None = field(
        None,
        help="calibration-set manifest [default: runs/calibration/<data>.json, from `edge-msd calibrate`]",
    )
    data: str | None = field(
        None, help="dataset spec of the calibration set and QAT data [default: the student's; give another "
        "to quantize on it deliberately]"
    )
    calib_batch: int = field(32, help="calibration batch size")
    min_calibration: int = field(MIN_SAMPLES, help="refuse calibration sets smaller than this")
    # On the demo's edge-s (BatchNorm folded, PTQ already lossless) 600 steps at lr 5e-5 left TFLite
    # int8 0.1 points under fp32; 2e-4 moved the student off its float optimum (0.3 under).
    steps: int = field(600, help="QAT optimizer steps (a short schedule)")
    lr: float = field(5e-5, help="QAT peak learning rate")
    batch_size: int = field(64, help="QAT images per step")
    warmup_steps: int = field(20, help="QAT warm-up steps")
    features: str | None = field(
        None,
        help="feature-cache root (holds <split>/) of the teacher embeddings for QAT [default: the student's]",
    )
    val_split: str | None = field(None, help="QAT validation split (best checkpoint); empty: the last step")
    out: str | None = field(
        None, help="output folder [default: runs/qat/<target>, PTQ: runs/qat/<target>-ptq]"
    )
    force: bool = field(False, help="replace an existing output folder")
    seed: int = field(0, help="seed of QAT data order")

    def validate(self) -> None:
        if self.method not in ("qat", "ptq"):
            raise ConfigError(f"field 'method' is {self.method!r}; expected qat or ptq")
        for name in ("calib_batch", "steps", "batch_size", "min_calibration"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field '{name}' must be positive, got {getattr(self, name)}")

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return paths.QAT / (self.target if self.method == "qat" else f"{self.target}-ptq")

    def resolved(self) -> QuantConfig:
        """Unset data, features and calibration filled from what the student recorded (never the demo's,
        unless the student was distilled on it)."""
        record = read_student_record(self.student)
        cfg = fill_from_record(self, record)
        if cfg.method == "qat":  # a split folder given for the root: say so now, not after calibration
            feature_split_dir(cfg.features, record.split("train", "train"), "--features")
        return cfg


@dataclasses.dataclass
class CalibrateConfig:
    """``edge-msd calibrate``: (re)build a calibration-set manifest."""

    student: str = field(
        str(paths.STUDENT), help="student whose data and train split are the defaults"
    )
    data: str | None = field(None, help="dataset spec [default: the student's]")
    split: str | None = field(None, help="split to draw from [default: the student's train split]")
    features: str | None = field(
        None, help="feature-cache root whose marks of bad images are left out [default: the student's]"
    )
    n: int = field(512, help="number of images")
    seed: int = field(0, help="seed of the stratified draw")
    name: str | None = field(None, help="name in the manifest [default: from data, split, n, seed]")
    min_samples: int = field(MIN_SAMPLES, help="refuse fewer samples than this")
    out: str | None = field(
        None, help="manifest to write [default: runs/calibration/<data>.json, where qat/ptq/export look]"
    )

    def resolved(self) -> CalibrateConfig:
        """Unset data, split and features from the student's record; ``out`` where the quantizing verbs
        look."""
        cfg = fill_from_record(self, read_student_record(self.student), split_role="train")
        return dataclasses.replace(cfg, out=self.out or str(calibration_out(cfg.data)))
