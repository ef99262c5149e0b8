"""The one interface every image-caption dataset implements.

A dataset is one split of images, each with one or more captions. Images are addressed by their
index in the split (0..n_images-1) and a stable ``image_keys[i]`` (file path, COCO id, shard/key);
captions by their index (0..n_captions-1) with ``caption_image_index[j]`` naming their image.
Feature caches and trainers key everything by these indices, never by batch position.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class ImageTextDataset(ABC):
    """One split of an image-caption dataset with random access to images."""

    spec: str  # the spec string it was opened with (e.g. "coco:/data/dataset_coco.json")
    split: str
    image_keys: list[str]
    captions: list[str]
    caption_image_index: np.ndarray  # int64, (n_captions,)
    labels: np.ndarray | None = None  # int64 class per image, when the data has classes
    class_names: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)  # bad samples dropped under --skip-bad

    @property
    def n_images(self) -> int:
        return len(self.image_keys)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """RGB image ``index``; raises DataError naming the file when it is missing or corrupt."""

    def captions_of(self, index: int) -> np.ndarray:
        return np.flatnonzero(self.caption_image_index == index)

    def fingerprint(self) -> str:
        """sha256 over what identifies the data: spec kind, split, image keys, captions and links."""
        h = hashlib.sha256()
        h.update(json.dumps([self.spec.split(":", 1)[0], self.split]).encode())
        for key in self.image_keys:
            h.update(key.encode("utf-8") + b"\0")
        for cap in self.captions:
            h.update(cap.encode("utf-8") + b"\0")
        h.update(np.asarray(self.caption_image_index, dtype=np.int64).tobytes())
        return h.hexdigest()
