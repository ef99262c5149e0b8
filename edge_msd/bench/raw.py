"""Raw inputs on the device: decode + resize + crop the sets' image files and tokenize their captions.

The steps the host did before export (open_clip's eval transform, open_clip's tokenizer) done again
here by the manifest's ``preprocessing`` rules and the bundle's tokenizer, so the recall measured from
them includes the device's own preprocessing. ``decode_image`` and ``tokenize`` are the per-query steps
(time them one query at a time); ``decode_images`` returns uint8 (N, H, W, 3) at model size, for the
normalisation the model's input contract asks for (edge_msd.contract.reading.tower_inputs).

Pillow is imported when an image is decoded, not at import: a device without it still benches the
host-prepared sets (``pillow_missing`` says why the raw path is skipped).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.bench.tokenizer import Tokenizer
from edge_msd.contract.format import TOKENIZER_DIR, at
from edge_msd.contract.numerics import cosine_summary
from edge_msd.contract.raw import IMAGE_BYTES, TEXTS, has_files, unpack_files
from edge_msd.contract.reading import Bundle
from edge_msd.errors import ArtifactError

NOT_IN_BUNDLE = "not in bundle"
# JPEG draft (DCT-scaled) decode to at least this many times the resize output: 2 keeps the resize
# antialiasing from real pixels (1: fastest, most drift; 0: full decode, equal to the host)
DRAFT = 2


def pillow_missing() -> str | None:
    """Why images cannot be decoded here, or None when Pillow imports."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return "Pillow is not installed (pip install Pillow)"
    return None


def _resized_size(w: int, h: int, size: tuple[int, int], mode: str) -> tuple[int, int]:
    """(width, height) after open_clip's eval resize: torchvision ``Resize(int)`` for a square
    ``shortest``, timm's ``ResizeKeepRatio`` otherwise, ``Resize((h, w))`` for ``squash``."""
    th, tw = size
    if mode == "squash":
        return tw, th
    if mode == "shortest" and th == tw:
        short, long = min(w, h), max(w, h)
        new_long = int(th * long / short)
        return (th, new_long) if w <= h else (new_long, th)
    if mode not in ("shortest", "longest"):
        raise ArtifactError(f"preprocessing.resize_mode {mode!r}: expected shortest, longest or squash")
    ratios = (h / th, w / tw)
    ratio = max(ratios) if mode == "longest" else min(ratios)
    return round(w / ratio), round(h / ratio)


def _centre_crop(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision's CenterCrop (open_clip's CenterCropOrPad): zero padding where the image is smaller."""
    th, tw = size
    h, w = a.shape[:2]
    if th > h or tw > w:
        top, left = max(0, (th - h) // 2), max(0, (tw - w) // 2)
        padded = np.zeros((max(h, th), max(w, tw), 3), np.uint8)
        padded[top:top + h, left:left + w] = a
        a, (h, w) = padded, padded.shape[:2]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return a[top:top + th, left:left + tw]


def decode_image(data: bytes, preprocessing: dict[str, Any], draft: int = DRAFT) -> np.ndarray:
    """One encoded image → uint8 (H, W, 3) RGB at the model's size, by the manifest's rules.

    JPEGs decode in draft mode (libjpeg's DCT scaling) to the smallest scale still at least ``draft``
    times the resize's output, then resize as the host did; the output size comes from the full
    image's size. Other formats (and ``draft`` 0) decode fully: equal to the host's preparation."""
    from PIL import Image

    size = tuple(int(s) for s in preprocessing.get("size", (224, 224)))
    resample = Image.BILINEAR if preprocessing.get("resize") == "bilinear" else Image.BICUBIC
    with Image.open(io.BytesIO(data)) as img:
        out_w, out_h = _resized_size(*img.size, size, preprocessing.get("resize_mode", "shortest"))
        if draft > 0:
            img.draft("RGB", (draft * out_w, draft * out_h))
        rgb = img.convert("RGB")
    if rgb.size != (out_w, out_h):
        rgb = rgb.resize((out_w, out_h), resample)
    return _centre_crop(np.asarray(rgb, dtype=np.uint8), size)


def decode_images(files: list[bytes], preprocessing: dict[str, Any], draft: int = DRAFT) -> np.ndarray:
    """Encoded images → uint8 (N, H, W, 3) at the model's size."""
    return np.stack([decode_image(f, preprocessing, draft) for f in files])


def bundle_tokenizer(bundle: Bundle) -> Tokenizer:
    folder = (bundle.manifest.get("tokenizer") or {}).get("dir") or TOKENIZER_DIR
    return Tokenizer.from_dir(Path(bundle.root) / folder)


def tokenize(tokenizer: Tokenizer, texts: list[str] | np.ndarray) -> np.ndarray:
    """Captions → int32 (M, context_length) token ids, as the text tower takes them."""
    return np.asarray(tokenizer([str(t) for t in texts]), dtype=np.int32).reshape(len(texts), -1)


def raw_reason(data: dict[str, np.ndarray] | None) -> str | None:
    """Why a set has no raw path here (None: it has one)."""
    if data is None or not has_files(data) or TEXTS not in data:
        return NOT_IN_BUNDLE
    return pillow_missing()


def token_diffs(device: np.ndarray, host: np.ndarray) -> dict[str, int]:
    """How far the device's token ids are from the host's: differing ids and rows (shape mismatch: all)."""
    if device.shape != host.shape:
        return {"ids": int(host.size), "rows": int(len(host)), "n_rows": int(len(host)), "shape_differs": 1}
    diff = device != host
    return {"ids": int(diff.sum()), "rows": int(diff.any(axis=1).sum()), "n_rows": int(len(host))}


def raw_inputs(bundle: Bundle, sets: dict[str, dict[str, np.ndarray] | None]) -> dict[str, Any]:
    """Make ``eval_raw`` / ``probe_raw`` in ``sets`` from the raw inputs of ``eval`` / ``probe``; returns
    the report's ``raw_inputs`` entry (per set: status, sizes, decode and tokenize times, token diffs,
    pixel differences against the host-prepared images)."""
    out: dict[str, Any] = {"images": at(bundle.manifest, "data", "raw", "images"), "jpeg_draft": DRAFT,
                           "sets": {}}
    tokenizer = None
    for name in ("eval", "probe"):
        data = sets.get(name)
        reason = raw_reason(data)
        if reason:
            out["sets"][name] = {"status": reason}
            continue
        try:
            tokenizer = tokenizer or bundle_tokenizer(bundle)
        except (OSError, ValueError, KeyError) as e:  # the host-prepared path still benches
            out["sets"][name] = {"status": f"bundle tokenizer unusable: {e}"}
            continue
        t0 = time.perf_counter()
        images = decode_images(unpack_files(data, str(bundle.root / name)),
                               bundle.manifest.get("preprocessing") or {})
        t1 = time.perf_counter()
        tokens = tokenize(tokenizer, data[TEXTS])
        t2 = time.perf_counter()
        sets[f"{name}_raw"] = {**data, "images": images, "tokens": tokens}
        host = data["images"]
        pixels = (np.abs(images.astype(np.int16) - host.astype(np.int16)) if images.shape == host.shape
                  else None)
        out["sets"][name] = {
            "status": "measured", "n_images": len(images), "n_texts": len(tokens),
            "file_bytes": int(data[IMAGE_BYTES].size),
            "decode_ms_per_image": 1e3 * (t1 - t0) / max(1, len(images)),
            "tokenize_ms_per_caption": 1e3 * (t2 - t1) / max(1, len(tokens)),
            "token_diffs": token_diffs(tokens, np.asarray(data["tokens"])),
            "pixel_abs_diff": None if pixels is None else {"mean": float(pixels.mean()),
                                                           "max": int(pixels.max())},
        }
    return out


def compare_raw(raw: dict[str, Any] | None, sets: dict[str, dict | None], embs: dict[str, dict],
                recall: dict[str, Any]) -> None:
    """Add to ``raw``'s measured sets what the raw path changed: recall (device minus host-prepared),
    the cosine of image embeddings device-decoded vs host-prepared, and (probe) parity against the
    PyTorch student's embeddings."""
    for name, entry in (raw or {}).get("sets", {}).items():
        key = f"{name}_raw"
        if entry.get("status") != "measured":
            continue
        image = embs.get("image", {})
        if name in image and key in image:
            entry["image_cosine"] = cosine_summary(image[key], image[name])
        if name in recall and key in recall:
            host, device = recall[name]["mean_R@1"], recall[key]["mean_R@1"]
            entry.update({"mean_R@1_host": host, "mean_R@1_device": device, "delta_mean_R@1": device - host})
        ref = sets.get(name) or {}
        entry["parity"] = {t: cosine_summary(e[key], ref[f"{t}_emb"]) for t, e in embs.items()
                           if key in e and f"{t}_emb" in ref}
