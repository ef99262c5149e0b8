"""Read a deploy bundle (docs/bundle.md): check it by the bundle rules, load its data, preprocess its
images as the manifest says."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.contract.format import FORMATS, MANIFEST, TOWERS
from edge_msd.contract.integrity import check_bundle
from edge_msd.errors import ArtifactError


@dataclasses.dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    digest: str  # sha256 of the canonical manifest (edge_msd.contract.integrity)
    signature: dict[str, str] | None = None  # set when a public key verified the bundle's signature

    def model(self, tower: str) -> dict[str, Any]:
        try:
            return self.manifest["models"][tower]
        except KeyError as e:
            raise ArtifactError(f"{self.root / MANIFEST}: no model for the {tower} tower") from e

    def model_path(self, tower: str) -> Path:
        return self.root / self.model(tower)["file"]

    def model_format(self, tower: str) -> str:
        entry = self.model(tower)
        return entry.get("format") or FORMATS.get(Path(entry["file"]).suffix, Path(entry["file"]).suffix)

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(t for t in TOWERS if t in self.manifest.get("models", {}))

    @property
    def target(self) -> dict[str, Any]:
        return self.manifest.get("target") or {}

    def load_npz(self, name: str) -> dict[str, np.ndarray] | None:
        """``probe.npz`` / ``evalset.npz`` as plain arrays, or None when the bundle has none."""
        path = self.root / name
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def open_bundle(path: str | Path, expect_digest: str | None = None, public_key: str | None = None) -> Bundle:
    """Read a bundle after the rule set that ``edge-msd bundle verify`` applies too (``check_bundle``)."""
    checked = check_bundle(path, expect_digest, public_key)
    return Bundle(Path(path), checked.manifest, checked.digest, checked.signature)


def _input_layout(bundle: Bundle, tower: str) -> str:
    inputs = bundle.model(tower).get("inputs") or [{}]
    return inputs[0].get("layout") or bundle.manifest.get("preprocessing", {}).get("layout", "NCHW")


def preprocess_images(images: np.ndarray, preprocessing: dict[str, Any], layout: str = "NCHW") -> np.ndarray:
    """uint8 (N, H, W, 3) RGB → float32 ``(x * scale - mean) / std`` in the model's layout."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ArtifactError(f"images have shape {images.shape}, expected (N, H, W, 3) uint8 RGB")
    x = images.astype(np.float32)
    if preprocessing.get("color_order", "RGB").upper() == "BGR":
        x = x[..., ::-1]
    scale = np.float32(preprocessing.get("scale", 1.0 / 255.0))
    mean = np.asarray(preprocessing.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32)
    std = np.asarray(preprocessing.get("std", [1.0, 1.0, 1.0]), dtype=np.float32)
    x = (x * scale - mean) / std
    if layout.upper() == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    elif layout.upper() != "NHWC":
        raise ArtifactError(f"unknown image layout {layout!r} (expected NCHW or NHWC)")
    return np.ascontiguousarray(x, dtype=np.float32)


def tower_inputs(bundle: Bundle, tower: str, data: dict[str, np.ndarray]) -> np.ndarray:
    """The model input of one tower for all rows of ``data`` (a probe or eval set)."""
    if tower == "image":
        return preprocess_images(
            data["images"], bundle.manifest.get("preprocessing", {}), _input_layout(bundle, tower)
        )
    return np.ascontiguousarray(data["tokens"], dtype=np.int32)
