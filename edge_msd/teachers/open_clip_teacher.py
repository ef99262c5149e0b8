"""Teachers that are open_clip models: by name + pretrained tag or weights file, or a local-dir folder.

Everything resolves offline: a pretrained tag is looked up in the Hugging Face cache and open_clip's
URL cache only (never downloaded); a missing file is an error naming what was looked for.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from edge_msd.artifacts import sha256_file
from edge_msd.errors import ArtifactError, ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def set_offline() -> None:
    """Make Hugging Face code fail instead of downloading (takes effect if huggingface_hub is not yet
    imported, which is why it runs before ``import open_clip``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def eval_transform(cfg: dict) -> Any:
    """open_clip's evaluation transform from a preprocess config (size, mean, std, resize mode…)."""
    import open_clip

    size = cfg["size"]
    return open_clip.image_transform(
        tuple(size) if isinstance(size, list) else size,
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
        fill_color=cfg.get("fill_color", 0),
    )


class OpenClipTeacher:
    """A Teacher around an open_clip model, its eval transform and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, teacher_id: str, device: str = "cpu"):
        import open_clip

        self.device = torch.device(device)
        # channels-last convolutions (oneDNN on the CPU, cuDNN with tensor cores): ~40% less time for a
        # convolutional image tower; the demo teacher's fit runs its trunk the same way, so both agree
        model.visual.to(memory_format=torch.channels_last)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.id = teacher_id
        self.preprocess_cfg: dict = dict(open_clip.get_model_preprocess_cfg(model))
        self._transform = eval_transform(self.preprocess_cfg)
        # Probing works for every open_clip model class (CLIP, CustomTextCLIP, timm/HF towers).
        self.embed_dim = int(self.encode_text(self.tokenize(["a photo"])).shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, D) L2-normalised float32 embeddings on the CPU."""
        with torch.inference_mode():
            x = images.to(self.device, memory_format=torch.channels_last)
            return self.model.encode_image(x, normalize=True).float().cpu()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids → (B, D) L2-normalised float32 embeddings on the CPU."""
        with torch.inference_mode():
            return self.model.encode_text(tokens.to(self.device), normalize=True).float().cpu()

    def num_params(self) -> dict[str, int]:
        m = self.model
        image = sum(p.numel() for p in m.visual.parameters())
        total = sum(p.numel() for p in m.parameters())
        return {"image": image, "text": total - image, "total": total}


# ---- open_clip:MODEL@PRETRAINED -------------------------------------------------------------


def known_model(
    name: str,
    what: str = "teacher spec",
    usage: str = "or a model config file open_clip:/path/config.json@WEIGHTS",
) -> str:
    """The registered open_clip model name, registering a ``.json`` model config file first; ``what``
    and ``usage`` say in the error whose spec it is and what else it may be."""
    import open_clip

    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"open_clip model config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if name.replace("/", "-") in open_clip.list_models():
        return name.replace("/", "-")
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"{what}: '{name}' is not an open_clip model{hint}. Use a name from open_clip.list_models(), {usage}"
    )


def resolve_pretrained_offline(model: str, tag: str, cache_dir: str | None = None) -> tuple[Path, dict]:
    """Local file of open_clip weights ``model``/``tag`` (HF cache or open_clip's URL cache), and its cfg."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model, tag)
    looked: list[str] = []
    if cfg.get("file"):
        looked.append(cfg["file"])
        if Path(cfg["file"]).is_file():
            return Path(cfg["file"]), cfg
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, os.path.splitext(filename)[0] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            looked.append(f"Hugging Face cache: {repo}/{name}")
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit), cfg
    if cfg.get("url"):
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
        looked.append(str(path))
        if path.is_file():
            return path, cfg
    raise ConfigError(
        f"open_clip weights {model}@{tag} are not on this machine and nothing is downloaded at run time; "
        f"looked for: {'; '.join(looked) or '(no source in its pretrained config)'}. Download the weights "
        f"elsewhere and give the file: open_clip:{model}@/path/to/open_clip_model.safetensors"
    )


def _weights_id(files: list[Path]) -> str:
    """sha256 identifying a set of weight/config files (one file: its own sha256)."""
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _create(name: str, device: str, **kwargs: Any) -> torch.nn.Module:
    import open_clip

    try:
        return open_clip.create_model(name, device=device, weights_only=True, **kwargs)
    except Exception as e:  # unpickling, safetensors, shape mismatch, HF config: all mean a bad file here
        where = kwargs.get("pretrained") or name
        raise ArtifactError(f"{where}: could not load open_clip model {name}: {load_error(e)}") from e


def load_error(e: Exception) -> str:
    """One line: torch's load_state_dict error lists missing/unexpected keys and size mismatches below
    its first line, and those say what the checkpoint is; any other error keeps its first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if "Error(s) in loading state_dict" in lines[0] and len(lines) > 1:
        details = "; ".join(ln if len(ln) <= 160 else ln[:157] + "..." for ln in lines[1:4])
        return f"the checkpoint's keys do not fit this architecture ({details})"
    return lines[0]


def load_open_clip(spec: str, rest: str, device: str = "cpu") -> OpenClipTeacher:
    """``open_clip:MODEL@PRETRAINED`` where PRETRAINED is a tag or a local weights file."""
    set_offline()
    import open_clip

    model_name, sep, pretrained = rest.partition("@")
    if not model_name or not sep or not pretrained:
        raise ConfigError(
            f"teacher spec {spec!r}: expected open_clip:MODEL@PRETRAINED (a pretrained tag such as "
            "ViT-B-32@laion2b_s34b_b79k, or a weights file open_clip:ViT-B-32@/path/weights.safetensors)"
        )
    name = known_model(model_name)
    path = Path(pretrained).expanduser()
    extra: dict[str, Any] = {}
    if path.is_file() or path.suffix in WEIGHT_SUFFIXES or os.sep in pretrained:
        if not path.is_file():
            raise ConfigError(f"teacher spec {spec!r}: weights file not found: {path}")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ConfigError(
                f"teacher spec {spec!r}: '{pretrained}' is neither a weights file nor a pretrained tag of "
                f"{name} (tags: {', '.join(tags) or 'none'})"
            )
        path, cfg = resolve_pretrained_offline(name, pretrained)
        # What open_clip would take from the tag itself when it downloads: preprocessing and activation.
        extra["force_preprocess_cfg"] = {
            k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg
        }
        extra["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    model = _create(name, device, pretrained=str(path), **extra)
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClipTeacher(model, tokenizer, f"{spec}|sha256:{_weights_id([path])}", device)


# ---- local-dir:/path --------------------------------------------------------------------------


def load_local_dir(spec: str, folder: str | Path, device: str = "cpu") -> OpenClipTeacher:
    """An open_clip model folder in HF hub layout (open_clip_config.json + weights)."""
    set_offline()
    import open_clip

    folder = Path(folder).expanduser().resolve()
    config_path = folder / "open_clip_config.json"
    if not folder.is_dir():
        raise ConfigError(f"teacher spec {spec!r}: folder not found: {folder}")
    if not config_path.is_file():
        raise ConfigError(
            f"teacher spec {spec!r}: {config_path} is missing (an open_clip model folder has "
            "open_clip_config.json + open_clip_model.safetensors)"
        )
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise ConfigError(
            f"teacher spec {spec!r}: no weights (*.safetensors, *.bin, *.pt, *.pth) in {folder}"
        )
    try:
        model_cfg = json.loads(config_path.read_text(encoding="utf-8"))["model_cfg"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{config_path}: not an open_clip config with a 'model_cfg' table ({e})") from e
    kwargs: dict[str, Any] = {}
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    hf_name = text_cfg.get("hf_model_name")
    # A folder that carries its own HF text config (like the demo teacher) loads wherever it is: a relative
    # name resolves against the folder; an absolute one (where it was built, which plain open_clip reads)
    # or one that names no folder is the folder itself, so a copied or moved teacher reads its own files.
    if hf_name and (folder / "config.json").is_file():
        local = folder / hf_name
        own = not Path(hf_name).is_absolute() and local.is_dir()
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(local if own else folder)
        text_cfg["hf_model_pretrained"] = False  # the weights come from the folder's checkpoint
        kwargs["text_cfg"] = text_cfg
    model = _create(f"local-dir:{folder}", device, **kwargs)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return OpenClipTeacher(model, tokenizer, f"{spec}|sha256:{_weights_id(weights)}", device)
