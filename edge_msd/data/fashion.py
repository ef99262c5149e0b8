"""``fashion-mnist``: 70,000 real 28x28 grayscale product photos, 10 classes, with caption templates.

Read from the Debian package ``dataset-fashion-mnist`` (idx .gz files in
/usr/share/datasets/fashion-mnist) or ``?root=DIR``. Splits: ``test`` (the 10k test file),
``val`` (``n_val`` images carved from the training file by a seeded permutation) and ``train``
(the rest). Captions are per class (several templates, ``captions_per_image`` per image, chosen by
a per-image RNG), so retrieval on this set is class-level.
"""

from __future__ import annotations

import gzip
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_msd.data.base import ImageTextDataset
from edge_msd.data.spec import Spec, check_positive, check_split, resolve_options
from edge_msd.errors import ConfigError, DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
PACKAGE = "dataset-fashion-mnist"
SPLITS = ["train", "val", "test"]
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_NOUNS = [
    "a t-shirt",
    "a pair of trousers",
    "a pullover",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a sneaker",
    "a bag",
    "an ankle boot",
]
TEMPLATES = (
    "a photo of {}",
    "a grayscale product photo of {}",
    "a small black and white picture of {}",
    "{} on a black background",
    "a low-resolution image showing {}",
    "a catalogue photo of {}, seen from the front",
    "an image of {} alone",
    "a centred picture of {} for an online shop",
)
DEFAULTS = {"root": DEFAULT_ROOT, "n_val": 5000, "seed": 0, "captions_per_image": 1, "max_images": 0}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx array (uint8 data) from a .gz file; wrong magic or size names the file."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(
            f"{path}: Fashion-MNIST file not found; install the Debian package {PACKAGE} "
            f"(apt-get install {PACKAGE}) or pass ?root=DIR with the idx .gz files"
        ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if len(data) < 8 or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path}: not an idx file (expected magic 0x{magic:08x} for this file)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    start = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - start != expected:
        raise DataError(
            f"{path}: truncated idx data: header says {dims} = {expected} bytes, found {len(data) - start}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


@dataclass
class FashionMNIST(ImageTextDataset):
    pixels: np.ndarray | None = None  # (n, 28, 28) uint8

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index], mode="L").convert("RGB")


def open_fashion_mnist(spec: Spec, split: str) -> FashionMNIST:
    opts = resolve_options(spec, DEFAULTS)
    if spec.path:
        raise ConfigError(f"dataset spec {spec.text!r}: fashion-mnist takes no path; use ?root=DIR")
    check_split(spec, split, SPLITS)
    check_positive(spec, opts, "n_val", "seed", "max_images", allow_zero=True)
    if not 1 <= opts["captions_per_image"] <= len(TEMPLATES):
        raise ConfigError(
            f"dataset spec {spec.text!r}: option 'captions_per_image': expected "
            f"1..{len(TEMPLATES)}, got {opts['captions_per_image']}"
        )
    root = Path(opts["root"])
    if not root.is_dir():
        raise DataError(
            f"{root}: Fashion-MNIST folder not found; install the Debian package {PACKAGE} "
            f"(apt-get install {PACKAGE}) or pass ?root=DIR"
        )
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x00000803)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x00000801)
    if len(images) != len(labels):
        raise DataError(f"{root}: {prefix} images ({len(images)}) and labels ({len(labels)}) differ in count")
    if int(labels.max(initial=0)) >= len(CLASS_NAMES):
        raise DataError(
            f"{root / f'{prefix}-labels-idx1-ubyte.gz'}: label {int(labels.max())} out of range 0..9"
        )
    if split == "test":
        rows = np.arange(len(images))
    else:
        if opts["n_val"] >= len(images):
            raise ConfigError(
                f"dataset spec {spec.text!r}: option 'n_val': expected fewer than the "
                f"{len(images)} training images, got {opts['n_val']}"
            )
        perm = np.random.default_rng(opts["seed"]).permutation(len(images))
        rows = np.sort(perm[: opts["n_val"]] if split == "val" else perm[opts["n_val"] :])
    if opts["max_images"]:
        rows = rows[: opts["max_images"]]
    captions: list[str] = []
    owner: list[int] = []
    for i, row in enumerate(rows):
        r = random.Random((opts["seed"] << 40) | (int(split == "test") << 32) | int(row))
        noun = _NOUNS[labels[row]]
        for t in r.sample(range(len(TEMPLATES)), opts["captions_per_image"]):
            captions.append(TEMPLATES[t].format(noun))
            owner.append(i)
    return FashionMNIST(
        spec=spec.text,
        split=split,
        image_keys=[f"{prefix}/{int(r):05d}" for r in rows],
        captions=captions,
        caption_image_index=np.asarray(owner, dtype=np.int64),
        labels=labels[rows].astype(np.int64),
        class_names=list(CLASS_NAMES),
        pixels=images[rows],
    )
