"""Student specs: which open_clip model a student is and what it starts from.

    edge-s                          a preset (``edge-msd students``), random weights
    open_clip:ARCH                  an open_clip architecture (``open_clip.list_models()``), random weights
    open_clip:ARCH@/path/file.pt    ... started from a checkpoint file (.safetensors, or .pt/.pth/.bin read
                                    with ``torch.load(weights_only=True)``)
    open_clip:ARCH@TAG              ... started from a pretrained tag, found in the local caches only
    local-dir:/path/folder          an open_clip folder (open_clip_config.json + weights), its weights
    config:/path/student.json       the user's own open_clip model config, random weights

The open_clip forms reuse the teacher loader's name checks and offline tag resolution
(``edge_msd.teachers.open_clip_teacher``). Weights are read without unpickling and, once loaded, checked
tensor by tensor against the file. The text tower must use open_clip's ``SimpleTokenizer`` (the CLIP BPE
the bundle's torch-free tokenizer reproduces): HF and SigLIP tokenizers are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_msd.artifacts import sha256_file
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.students.presets import list_presets, preset_config, quiet_open_clip
from edge_msd.teachers.open_clip_teacher import (
    WEIGHT_SUFFIXES,
    known_model,
    load_error,
    resolve_pretrained_offline,
    set_offline,
)

FORMS = (
    "a preset (edge-xs, edge-s, edge-m), open_clip:ARCH, open_clip:ARCH@/path/weights.safetensors|.pt, "
    "open_clip:ARCH@PRETRAINED_TAG, local-dir:/path/open_clip_folder, config:/path/model_config.json"
)
SUPPORTED_TOKENIZER = (
    "edge-msd students use open_clip's SimpleTokenizer (CLIP BPE, vocab 49408, clean='lower'), the one the "
    "bundle's tokenizer serves"
)
CLIP_VOCAB = 49408


@dataclass(frozen=True)
class StudentSpec:
    """A parsed spec: ``kind`` is preset, open_clip, local-dir or config."""

    spec: str
    kind: str
    arch: str  # preset name, open_clip model name, folder or config file
    weights: str | None = None  # open_clip: a tag or a file


@dataclass
class BuiltStudent:
    """A freshly built student, the open_clip model config it was built from and where it started."""

    model: nn.Module
    model_cfg: dict[str, Any]
    start: dict[str, Any]  # spec, image size, weights file + sha256 (recorded in the student manifest)


# The built model carries its config and start to the end of training, where the folder is saved: an
# attribute (not state), so checkpoints, EMA copies (deepcopy keeps it) and device moves leave it alone.
_BUILD_ATTR = "edge_msd_build"


def remember_build(model: nn.Module, model_cfg: dict[str, Any], start: dict[str, Any]) -> nn.Module:
    object.__setattr__(model, _BUILD_ATTR, (model_cfg, start))
    return model


def build_of(model: nn.Module) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(model config, start record) that ``build_student`` gave ``model``; (None, None) for others."""
    return getattr(model, _BUILD_ATTR, (None, None))


def parse_student_spec(spec: str) -> StudentSpec:
    """The spec's parts, checked: a known preset or arch, an existing file or folder."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"student spec {spec!r}: empty; expected one of {FORMS}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        if spec in list_presets():
            return StudentSpec(spec, "preset", spec)
        raise ConfigError(_unknown_bare_name(spec))
    if kind == "open_clip":
        arch, _, weights = rest.partition("@")
        name = known_model(arch, what=f"student spec {spec!r}", usage="or config:/path/model_config.json")
        if weights and _is_file_like(weights) and not Path(weights).expanduser().is_file():
            raise ConfigError(f"student spec {spec!r}: weights file not found: {Path(weights).expanduser()}")
        return StudentSpec(spec, kind, name, weights or None)
    if kind in ("local-dir", "config") and rest:
        path = Path(rest).expanduser()
        want = "folder" if kind == "local-dir" else "file"
        if not (path.is_dir() if kind == "local-dir" else path.is_file()):
            raise ConfigError(f"student spec {spec!r}: {want} not found: {path}")
        return StudentSpec(spec, kind, str(path.resolve()))
    raise ConfigError(f"student spec {spec!r}: unknown form; expected one of {FORMS}")


def _unknown_bare_name(spec: str) -> str:
    """Why a bare name is no student: an open_clip arch without its prefix, or close to a known name."""
    import difflib

    import open_clip

    if spec.replace("/", "-") in open_clip.list_models():
        return f"student spec {spec!r}: an open_clip architecture is written open_clip:{spec}"
    names = list(dict.fromkeys(list_presets() + open_clip.list_models()))  # the presets are registered too
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (f"student spec {spec!r}: not a preset (known: {', '.join(list_presets())}){hint}; "
            f"expected one of {FORMS}")


def spec_folder_name(spec: str) -> str:
    """A folder name for a spec's run: the preset itself, else a readable slug + a hash of the spec."""
    if spec in list_presets():
        return spec
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.")[-40:]
    return f"{slug}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def _is_file_like(weights: str) -> bool:
    return Path(weights).suffix in WEIGHT_SUFFIXES or "/" in weights or Path(weights).expanduser().is_file()


def spec_model_config(spec: str, image_size: int | None = None) -> dict[str, Any]:
    """The open_clip model config of ``spec`` (a copy), with ``image_size`` overridden if given; its text
    tower checked to use the tokenizer edge-msd serves."""
    s = parse_student_spec(spec)
    if s.kind == "preset":
        cfg = preset_config(s.arch)
    elif s.kind == "open_clip":
        import open_clip

        cfg = open_clip.get_model_config(s.arch)
    elif s.kind == "local-dir":
        cfg = _read_json(Path(s.arch) / "open_clip_config.json", "model_cfg")
    else:
        data = _read_json(Path(s.arch), None)
        cfg = data.get("model_cfg", data)  # a bare model config, or an open_clip_config.json
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ConfigError(f"student spec {spec!r}: the model config has no {key!r}")
    cfg = json.loads(json.dumps(cfg))  # a deep copy: open_clip's registry keeps its own
    if image_size is not None:
        if image_size < 16:
            raise ConfigError(f"field 'image_size': expected >= 16, got {image_size}")
        cfg["vision_cfg"]["image_size"] = int(image_size)
    check_tokenizer(cfg, s)
    return cfg


def _read_json(path: Path, key: str | None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found (an open_clip folder holds open_clip_config.json)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or (key and not isinstance(data.get(key), dict)):
        raise ConfigError(f"{path}: expected a JSON object{f' with a {key!r} table' if key else ''}")
    return data[key] if key else data


def check_tokenizer(model_cfg: dict[str, Any], s: StudentSpec) -> None:
    """ConfigError (one line) unless the text tower is open_clip's own with the CLIP BPE tokenizer."""
    text = model_cfg.get("text_cfg", {})
    why = None
    if text.get("hf_model_name"):
        why = f"its text tower is the Hugging Face model {text['hf_model_name']!r}"
    elif text.get("hf_tokenizer_name"):
        why = f"it uses the Hugging Face tokenizer {text['hf_tokenizer_name']!r}"
    elif s.kind == "open_clip" and "siglip" in s.arch.lower():
        why = "open_clip gives SigLIP models the SigLIP tokenizer"
    elif text.get("tokenizer_kwargs"):
        why = f"it sets tokenizer_kwargs {text['tokenizer_kwargs']}"
    elif int(text.get("vocab_size", CLIP_VOCAB)) != CLIP_VOCAB:
        why = f"its vocabulary has {text['vocab_size']} tokens"
    if why:
        raise ConfigError(f"student spec {s.spec!r}: {why}; {SUPPORTED_TOKENIZER}")


def build_student(
    spec: str, embed_dim: int | None = None, image_size: int | None = None, default_dim: int | None = None
) -> BuiltStudent:
    """The student ``spec`` names (float32, CPU), its weights loaded and verified when it names some.

    ``embed_dim`` sets the embedding size (random starts only); ``default_dim`` (the teacher's) is used
    when it is not given and the start has no weights of its own.
    """
    s = parse_student_spec(spec)
    cfg = spec_model_config(spec, image_size)
    weights, tag_cfg = _weights_file(s)
    if weights is not None and embed_dim is not None and embed_dim != cfg["embed_dim"]:
        raise ConfigError(f"field 'embed_dim': {embed_dim} given, but {spec!r} starts from weights of "
                          f"embed_dim {cfg['embed_dim']} (leave it unset: an adaptor bridges to the teacher)")
    dim = embed_dim or (default_dim if weights is None else None)
    if dim is not None:
        cfg["embed_dim"] = int(dim)
    if tag_cfg.get("quick_gelu"):  # the activation the tag was trained with, as open_clip's factory sets it
        cfg["quick_gelu"] = True
    model = _create(cfg, s)
    start: dict[str, Any] = {"spec": s.spec, "kind": s.kind, "image_size": cfg["vision_cfg"]["image_size"]}
    if image_size is not None:
        _probe_image_size(model, cfg, s)
    if weights is not None:
        start["weights"] = {"file": str(weights), "sha256": sha256_file(weights),
                            "verified": load_verified(model, weights, spec)}
    remember_build(model, cfg, start)
    return BuiltStudent(model, cfg, start)


def _weights_file(s: StudentSpec) -> tuple[Path | None, dict[str, Any]]:
    """The weights file a spec starts from (None: random) and the pretrained tag's config ({} if none)."""
    if s.kind == "local-dir":
        folder = Path(s.arch)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if not files:
            kinds = ", ".join(WEIGHT_SUFFIXES)
            raise ConfigError(f"student spec {s.spec!r}: no weights ({kinds}) in {folder}")
        return (next((p for p in files if p.suffix == ".safetensors"), files[0]), {})
    if s.kind != "open_clip" or not s.weights:
        return None, {}
    if _is_file_like(s.weights):
        return Path(s.weights).expanduser().resolve(), {}
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(s.arch)
    if s.weights not in tags:
        raise ConfigError(f"student spec {s.spec!r}: '{s.weights}' is neither a weights file nor a "
                          f"pretrained tag of {s.arch} (tags: {', '.join(tags) or 'none'})")
    set_offline()
    return resolve_pretrained_offline(s.arch, s.weights)


def _create(cfg: dict[str, Any], s: StudentSpec) -> nn.Module:
    """The open_clip model class for ``cfg`` (as open_clip's factory picks it), randomly initialised."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = json.loads(json.dumps(cfg))
    if "multimodal_cfg" in cfg:
        raise ConfigError(f"student spec {s.spec!r}: a CoCa model (multimodal_cfg) cannot be a student")
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # a student's weights are its start, or random
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    try:
        with quiet_open_clip():
            model = cls(**cfg)
    except Exception as e:  # a bad user config: an unknown key or a wrong shape surfaces here
        why = load_error(e)
        raise ConfigError(f"student spec {s.spec!r}: open_clip cannot build this config ({why})") from e
    return model.float()


def _probe_image_size(model: nn.Module, cfg: dict[str, Any], s: StudentSpec) -> None:
    """ConfigError unless the image tower runs at the overridden size (native ViTs need a multiple of the
    patch size; timm and ResNet towers whatever their strides and pooling allow)."""
    size = int(cfg["vision_cfg"]["image_size"])
    patch = cfg["vision_cfg"].get("patch_size")
    why = f"not a multiple of the patch size {patch}" if patch and size % int(patch) else None
    if why is None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model.encode_image(torch.zeros(1, 3, size, size))
        except Exception as e:  # the tower's own shape error says which op cannot take the size
            why = load_error(e)
        finally:
            model.train(was)
    if why:
        raise ConfigError(f"student spec {s.spec!r}: image size {size} does not fit its image tower ({why})")


def read_state_dict(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, never unpickled, in open_clip's key layout."""
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # open_clip training checkpoints
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ArtifactError(f"{path}: not a state dict of tensors")
    if next(iter(state)).startswith("module."):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = convert_state_dict(model, state)  # third-party layouts (e.g. Apple's MobileCLIP files)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    return state


def load_verified(model: nn.Module, path: Path, spec: str) -> str:
    """Load ``path`` into ``model`` strictly, then check every tensor equals the file's; returns how."""
    try:
        state = read_state_dict(path, model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ArtifactError(f"student spec {spec!r}: {path}: {load_error(e)}") from e
    loaded = model.state_dict()
    differ = [k for k, v in state.items() if not torch.equal(loaded[k], v.to(loaded[k].dtype))]
    if differ:
        raise ArtifactError(f"student spec {spec!r}: after loading {path}, {len(differ)} tensor(s) differ "
                            f"from the file ({', '.join(differ[:3])})")
    return f"all {len(state)} tensors equal to the file's after load"


def run_model_config(spec: str, image_size: int | None = None, init: str | None = None) -> dict[str, Any]:
    """The open_clip config a distill run's student has: an ``init`` folder's own, else the spec's."""
    if init:
        cfg = _read_json(Path(init) / "open_clip_config.json", "model_cfg")
        if image_size is not None and int(cfg["vision_cfg"]["image_size"]) != image_size:
            raise ConfigError(f"field 'image_size': {image_size}, but the init student {init} takes "
                              f"{cfg['vision_cfg']['image_size']} (leave it unset with --init)")
        check_tokenizer(cfg, StudentSpec(f"local-dir:{init}", "local-dir", str(init)))
        return cfg
    return spec_model_config(spec, image_size)


def init_start(spec: str, folder: str | Path, weights_sha256: str) -> dict[str, Any]:
    """The start record of a student that continues from a saved student folder (``--init``)."""
    return {"spec": spec, "kind": "init", "init": str(Path(folder).resolve()),
            "weights": {"file": str(Path(folder).resolve() / "open_clip_model.safetensors"),
                        "sha256": weights_sha256, "verified": "manifest sha256 checked before load"}}
