"""Student presets (open_clip model configs), student specs and the student folder format."""

from edge_msd.students.presets import (
    DEFAULT_PRESET,
    LoadedStudent,
    create_student,
    describe_presets,
    list_presets,
    load_open_clip_student,
    preset_config,
    save_student,
    student_transform,
    tower_flops,
    tower_params,
)
from edge_msd.students.spec import build_student, parse_student_spec

__all__ = [
    "DEFAULT_PRESET", "LoadedStudent", "build_student", "create_student", "describe_presets", "list_presets",
    "load_open_clip_student", "parse_student_spec", "preset_config", "save_student", "student_transform",
    "tower_flops", "tower_params",
]
