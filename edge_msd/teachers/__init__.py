"""Teacher adapters, selected by a spec string.

open_clip:MODEL@PRETRAINED   open_clip model name (or a model config .json) + pretrained tag
                             (resolved from local caches only) or a local weights file
local-dir:/path              open_clip model folder (open_clip_config.json + open_clip_model.safetensors)
onnx:/dir                    image.onnx + text.onnx + teacher.json, run with onnxruntime
demo                         the embedded demo teacher built by `edge-msd teacher fit`
"""

from __future__ import annotations

from typing import Any

from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.teachers.base import Teacher

FORMS = (
    "open_clip:MODEL@PRETRAINED (tag or weights file), local-dir:/path/to/open_clip_folder, "
    "onnx:/path/to/folder, demo"
)


def load_teacher(spec: str, device: str = "cpu") -> Teacher:
    """The teacher a spec names; ConfigError (listing the forms) when it names none."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"teacher spec {spec!r}: empty; expected one of {FORMS}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if spec == "demo":
        return load_demo_teacher(device)
    if kind == "open_clip" and sep:
        from edge_msd.teachers.open_clip_teacher import load_open_clip

        return load_open_clip(spec, rest, device)
    if kind == "local-dir" and rest:
        from edge_msd.teachers.open_clip_teacher import load_local_dir

        return load_local_dir(spec, rest, device)
    if kind == "onnx" and rest:
        from edge_msd.teachers.onnx_teacher import OnnxTeacher

        return OnnxTeacher(rest, spec, device)
    # A bare model name ("ViT-B-32") is the usual slip: point at the open_clip form and close names.
    import difflib

    import open_clip

    close = difflib.get_close_matches(spec.split("@")[0], open_clip.list_models(), n=5, cutoff=0.6)
    hint = (
        f" (close open_clip models: {', '.join(close)}; write open_clip:{close[0]}@PRETRAINED)"
        if close
        else ""
    )
    raise ConfigError(f"teacher spec {spec!r} names no known teacher{hint}; expected one of {FORMS}")


def load_demo_teacher(device: str = "cpu") -> Teacher:
    """The demo teacher from paths.demo_teacher_dir(), its files checked against its manifest."""
    from edge_msd.artifacts import read_manifest, verify_files
    from edge_msd.paths import demo_teacher_dir
    from edge_msd.teachers.demo_config import KIND
    from edge_msd.teachers.open_clip_teacher import load_local_dir

    folder = demo_teacher_dir()
    if not (folder / "manifest.json").is_file():
        raise ArtifactError(
            f"the demo teacher is not built yet ({folder} has no manifest.json): "
            "run `edge-msd teacher fit` first (a few minutes on a CPU)"
        )
    verify_files(folder, read_manifest(folder, kind=KIND))
    return load_local_dir("demo", folder, device)


def teacher_info(teacher: Teacher) -> dict[str, Any]:
    """Id, embedding size, parameter counts (open_clip teachers) and preprocessing of a teacher."""
    info: dict[str, Any] = {"id": teacher.id, "type": type(teacher).__name__, "embed_dim": teacher.embed_dim}
    num_params = getattr(teacher, "num_params", None)
    if num_params is not None:
        info["params"] = num_params()
    pre = getattr(teacher, "preprocess_cfg", None) or {}
    info["preprocess"] = {
        k: pre[k] for k in ("size", "mean", "std", "interpolation", "resize_mode") if k in pre
    }
    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is not None:
        info["tokenizer"] = {
            "type": type(tokenizer).__name__,
            "context_length": getattr(tokenizer, "context_length", None),
        }
    return info


def print_teacher_info(spec: str, device: str = "cpu") -> None:
    import json

    import click

    click.echo(json.dumps(teacher_info(load_teacher(spec, device)), indent=2, default=str))


__all__ = ["FORMS", "Teacher", "load_demo_teacher", "load_teacher", "print_teacher_info", "teacher_info"]
