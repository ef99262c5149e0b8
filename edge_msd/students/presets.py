"""Student presets: open_clip model configs (architecture as data) and their save/load format.

A student is a plain open_clip ``CLIP`` model: a small image tower (a timm MobileNetV4 trained from
scratch, or open_clip's native ViT for ``edge-xs``) and a small text transformer with open_clip's
default CLIP BPE tokenizer. Presets are the JSON files in ``model_configs/``, registered with
``open_clip.add_model_config``. A saved student is a folder in the Hugging Face hub layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so that
``open_clip.create_model_and_transforms('local-dir:DIR')`` and ``open_clip.get_tokenizer('local-dir:DIR')``
load it without edge-msd; ``manifest.json`` beside them records provenance and file hashes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from edge_msd.artifacts import atomic_dir, read_manifest, verify_files, write_manifest
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.lineage import STUDENT_KIND

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DEFAULT_PRESET = "edge-s"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# The text tower uses open_clip's SimpleTokenizer with the BPE vocabulary bundled in open_clip:
# get_tokenizer picks it for any config without ``hf_tokenizer_name``, so nothing else is saved.
TOKENIZER_INFO = {
    "type": "open_clip.SimpleTokenizer",
    "vocab": "bpe_simple_vocab_16e6 (bundled with open_clip)",
}

_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_presets() -> list[str]:
    """Preset names, smallest first (the JSON files in ``model_configs/``)."""
    names = [p.stem for p in CONFIG_DIR.glob("*.json")]
    order = {"xs": 0, "s": 1, "m": 2, "l": 3}
    return sorted(names, key=lambda n: (order.get(n.rsplit("-", 1)[-1], 99), n))


def preset_config(preset: str, embed_dim: int | None = None) -> dict[str, Any]:
    """The open_clip model config of ``preset`` (a copy), with ``embed_dim`` overridden if given."""
    path = CONFIG_DIR / f"{preset}.json"
    if preset not in list_presets():
        raise ConfigError(f"unknown student preset {preset!r}; known: {', '.join(list_presets())}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if embed_dim is not None:
        if embed_dim <= 0:
            raise ConfigError(f"student embed_dim must be positive, got {embed_dim}")
        cfg["embed_dim"] = int(embed_dim)
    return cfg


def create_student(preset: str, embed_dim: int | None = None) -> nn.Module:
    """A freshly initialised open_clip model of ``preset`` (random weights, float32, CPU)."""
    cfg = preset_config(preset, embed_dim)  # validates the name first
    _register()
    with quiet_open_clip():  # it warns that no pretrained weights were loaded: a student starts random
        return open_clip.create_model(preset, **({"embed_dim": cfg["embed_dim"]} if embed_dim else {}))


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """open_clip's warnings off while a student is built (it warns that no pretrained weights were loaded)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def embed_dim_of(model: nn.Module) -> int:
    """The embedding size of an open_clip model (CLIP keeps the text projection on the model,
    CustomTextCLIP on its ``.text`` tower)."""
    owner = model if hasattr(model, "text_projection") else getattr(model, "text", None)
    proj = getattr(owner, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return int(proj.out_features)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    raise ConfigError(f"{type(model).__name__}: no text projection to read the embedding size from")


def student_model_config(model: nn.Module, preset: str) -> dict[str, Any]:
    """The preset's config with the embed dim the model actually has."""
    return preset_config(preset, embed_dim=embed_dim_of(model))


def preprocess_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip preprocess settings of a student (CLIP mean/std at the tower's resolution)."""
    return {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def student_transform(model_cfg: dict[str, Any]) -> Callable:
    """The eval preprocess (PIL → normalised tensor) that open_clip builds for this config."""
    p = preprocess_config(model_cfg)
    return open_clip.image_transform(
        p["size"],
        is_train=False,
        mean=tuple(p["mean"]),
        std=tuple(p["std"]),
        interpolation=p["interpolation"],
        resize_mode=p["resize_mode"],
    )


def save_student(
    model: nn.Module,
    out_dir: str | Path,
    preset: str,
    extra_manifest: dict[str, Any] | None = None,
    force: bool = True,
    model_cfg: dict[str, Any] | None = None,
    start: dict[str, Any] | None = None,
) -> Path:
    """Write the student folder atomically: open_clip config + safetensors + manifest.

    ``preset`` is the student spec (a preset name or another form, ``edge_msd.students.spec``);
    ``model_cfg`` the open_clip config the model was built from (default: the preset's) and ``start``
    what it started from (spec, weights file and sha256), recorded in the manifest.
    """
    from safetensors.torch import save_file

    model_cfg = model_cfg if model_cfg is not None else student_model_config(model, preset)
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir, force=force) as tmp:
        config = {
            "model_cfg": model_cfg,
            "preprocess_cfg": preprocess_config(model_cfg),
            "edge_msd": {"preset": preset, "tokenizer": TOKENIZER_INFO},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        # One metadata key: safetensors writes its metadata map in hash order, so with several keys the
        # bytes of identical weights would differ from save to save (the preset is in CONFIG_FILE).
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_manifest(
            tmp,
            STUDENT_KIND,
            config=None,
            preset=preset,
            model_cfg=model_cfg,
            tokenizer={**TOKENIZER_INFO, "context_length": model_cfg["text_cfg"]["context_length"]},
            params=tower_params(model),
            start=start or {"spec": preset},
            **(extra_manifest or {}),
        )
    return out_dir


@dataclass
class LoadedStudent:
    """A student read back from its folder, with what is needed to run it."""

    model: nn.Module
    preprocess: Callable  # PIL image → (C, H, W) tensor
    tokenizer: Callable  # list[str] → (B, context_length) int64 tokens
    preset: str
    manifest: dict[str, Any] = field(default_factory=dict)


def load_open_clip_student(path: str | Path, verify: bool = True) -> LoadedStudent:
    """Load a saved student (checking its manifest and file hashes) through plain open_clip."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: student folder not found (run `edge-msd distill` first)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ArtifactError(f"{path} is not a student folder: {name} is missing")
    manifest = read_manifest(path, kind=STUDENT_KIND)
    if verify:
        verify_files(path, manifest)
    spec = f"local-dir:{path}"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec)
        tokenizer = open_clip.get_tokenizer(spec)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: open_clip cannot load this student ({e})") from e
    model.eval()
    return LoadedStudent(model, preprocess, tokenizer, manifest.get("preset", "?"), manifest)


def tower_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts of the image tower, the text tower (everything but visual/logit) and the total."""
    image = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    extra = sum(p.numel() for n, p in model.named_parameters() if n.startswith("logit_"))
    return {"image": image, "text": total - image - extra, "total": total}


def tower_flops(model: nn.Module, image_size: int, context_length: int) -> dict[str, int]:
    """FLOPs of one image and one caption (torch.utils.flop_counter; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, fn, x in (
            ("image", model.encode_image, torch.zeros(1, 3, image_size, image_size)),
            ("text", model.encode_text, torch.ones(1, context_length, dtype=torch.long)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                fn(x)
            out[name] = int(counter.get_total_flops())
    model.train(was_training)
    return out


def describe_presets() -> list[dict[str, Any]]:
    """One row per preset: params and FLOPs per tower, resolution, context length, embed dim."""
    rows = []
    for preset in list_presets():
        cfg = preset_config(preset)
        model = create_student(preset)
        res, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
        rows.append(
            {
                "preset": preset,
                "default": preset == DEFAULT_PRESET,
                "params": tower_params(model),
                "flops": tower_flops(model, res, ctx),
                "resolution": res,
                "context_length": ctx,
                "embed_dim": cfg["embed_dim"],
                "image_tower": _tower_name(cfg["vision_cfg"]),
                "text_tower": f"{cfg['text_cfg']['layers']}x{cfg['text_cfg']['width']}",
            }
        )
    return rows


def _tower_name(vision_cfg: dict[str, Any]) -> str:
    if "timm_model_name" in vision_cfg:
        return vision_cfg["timm_model_name"]
    return f"ViT/{vision_cfg['patch_size']} {vision_cfg['layers']}x{vision_cfg['width']}"


def print_presets_table() -> None:
    """The ``edge-msd students`` table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="student presets (open_clip configs; FLOPs for one image / one caption)")
    for col in (
        "preset",
        "image tower",
        "img params",
        "img MFLOPs",
        "text tf",
        "txt params",
        "txt MFLOPs",
        "res",
        "ctx",
        "dim",
    ):
        table.add_column(col, justify="left" if col in ("preset", "image tower", "text tf") else "right")
    for r in describe_presets():
        table.add_row(
            r["preset"] + (" (default)" if r["default"] else ""),
            r["image_tower"],
            f"{r['params']['image'] / 1e6:.2f}M",
            f"{r['flops']['image'] / 1e6:.1f}",
            r["text_tower"],
            f"{r['params']['text'] / 1e6:.2f}M",
            f"{r['flops']['text'] / 1e6:.1f}",
            str(r["resolution"]),
            str(r["context_length"]),
            str(r["embed_dim"]),
        )
    Console().print(table)
