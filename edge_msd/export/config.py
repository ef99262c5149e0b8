"""The config of ``edge-msd export`` (no torch import: the CLI builds its options from it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edge_msd import paths
from edge_msd.config import field
from edge_msd.errors import ConfigError
from edge_msd.lineage import fill_from_record, read_student_record


@dataclasses.dataclass
class ExportConfig:
    """``edge-msd export``: ship a student (float, or a quantized artifact) for one target as a bundle."""

    target: str = field("tflite", help="target profile: jetson | coreml | tflite | onnx | a profile .toml")
    student: str | None = field(
        None, help=f"float student [default: the --quantized artifact's student, else {paths.STUDENT}]"
    )
    quantized: str | None = field(
        None, help="quantized artifact to ship (`edge-msd qat`/`ptq` output, e.g. runs/qat/tflite); int8"
    )
    precision: str | None = field(
        None, help="fp32 | fp16 | int8 [default: the profile's; int8 with --quantized]"
    )
    out: str | None = field(None, help="bundle folder [default: runs/export/<target>]")
    data: str | None = field(
        None, help="dataset spec of the probe, eval and calibration sets [default: the student's]"
    )
    split: str | None = field(
        None, help="split of the probe and eval sets [default: the student's test split]"
    )
    probe_images: int = field(16, help="images in the parity probe set (with all their captions)")
    eval_images: int = field(0, help="images in the on-device eval set (0: the whole split)")
    calibration: str | None = field(
        None, help="calibration-set manifest for int8 without --quantized (post-training quantization) "
        "[default: runs/calibration/<data>.json]"
    )
    force: bool = field(False, help="replace an existing bundle")
    allow_parity_fail: bool = field(False, help="keep the bundle even when parity fails")
    tar: bool = field(False, help="also write <out>.tar.gz")

    def validate(self) -> None:
        if self.quantized and self.precision not in (None, "", "int8"):
            raise ConfigError(f"--quantized ships int8 models; --precision {self.precision} contradicts it")
        if self.probe_images < 1 or self.eval_images < 0:
            raise ConfigError("field 'probe_images' must be ≥ 1 and 'eval_images' ≥ 0")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else paths.EXPORT / Path(self.target).stem

    def student_dir(self) -> Path:
        return Path(self.student) if self.student else paths.STUDENT

    def resolved(self, student_dir: Path, need_data: bool = True) -> ExportConfig:
        """Unset data, split and calibration from what the student at ``student_dir`` recorded;
        ``need_data`` False when the caller brings its own probe/eval dataset."""
        return fill_from_record(self, read_student_record(student_dir), need_data=need_data)
