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


# an input entry's flag (docs/bundle.md): the model casts and normalises uint8 NHWC frames itself
IN_MODEL = "normalised_in_model"


def input_contract(bundle: Bundle, tower: str) -> dict[str, Any]:
    """What the first input of ``tower``'s model takes: dtype, layout, shape and whether normalisation is
    in the model; bundles written before the flag existed take float32 normalised by the host."""
    entry = dict((bundle.model(tower).get("inputs") or [{}])[0])
    entry.setdefault("dtype", "float32")
    if tower == "image":
        entry.setdefault("layout", bundle.manifest.get("preprocessing", {}).get("layout", "NCHW"))
        entry.setdefault(IN_MODEL, False)
    return entry


def describe_contract(contract: dict[str, Any]) -> str:
    """One line naming an input's contract, for errors."""
    where = "normalised in the model" if contract.get(IN_MODEL) else "normalised by the host"
    shape = "×".join("N" if i == 0 else str(d) for i, d in enumerate(contract.get("shape") or []))
    return (f"input {contract.get('name', '?')!r} takes {contract.get('dtype')} "
            f"{contract.get('layout', '')} {shape} ({where})").replace("  ", " ")


def image_model_input(
    images: np.ndarray, preprocessing: dict[str, Any], contract: dict[str, Any]
) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB frames at model size → the image model's input, as its contract says: the
    frames themselves where normalisation is in the model, else ``preprocess_images``. The one place
    that decides; a raw-file decode step hands its uint8 frames here."""
    if not contract.get(IN_MODEL):
        return preprocess_images(images, preprocessing, contract.get("layout", "NCHW"))
    want = tuple(int(d) for d in (contract.get("shape") or [])[1:])
    if images.dtype != np.uint8 or images.ndim != 4 or (want and images.shape[1:] != want):
        raise ArtifactError(f"image query is {images.dtype} {tuple(images.shape)}; the model's "
                            f"{describe_contract(contract)}")
    return np.ascontiguousarray(images)


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
        return image_model_input(
            data["images"], bundle.manifest.get("preprocessing", {}), input_contract(bundle, tower)
        )
    return np.ascontiguousarray(data["tokens"], dtype=np.int32)
