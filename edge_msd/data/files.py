"""Image files on disk with captions listed in a CSV/TSV file or a Karpathy JSON file.

Shared here: decoding an image with errors that name the file, checking captions (empty, not
valid UTF-8), and ``Collector``, which groups caption rows by image, checks that image files
exist, and either raises or (with ``skip_bad``) drops and records what is bad.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_msd.artifacts import is_inside
from edge_msd.data.base import ImageTextDataset
from edge_msd.errors import BadSampleError, DataError

_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_image(source: str | Path | bytes, where: str, index: int) -> Image.Image:
    """Decode fully (so truncation shows here, not later) to RGB; errors name ``where``."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadSampleError(f"{where}: image file not found", image_index=index) from None
    except _DECODE_ERRORS as e:
        raise BadSampleError(
            f"{where}: cannot decode image (corrupt or truncated?): {e}", image_index=index
        ) from None


def check_caption(text: object, where: str) -> str:
    """The caption stripped; raises DataError naming ``where`` when it is not usable text."""
    if not isinstance(text, str):
        raise DataError(f"{where}: expected a caption string, got {type(text).__name__}")
    if "\ufffd" in text:
        raise DataError(f"{where}: caption is not valid UTF-8")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a "\udcff" escape in JSON
        raise DataError(f"{where}: caption is not valid UTF-8") from None
    text = text.strip()
    if not text:
        raise DataError(f"{where}: empty caption")
    return text


def decode_utf8(data: bytes, name: str, skip_bad: bool) -> str:
    """Text of a captions file; invalid bytes name the line, or become U+FFFD under ``skip_bad``
    (``check_caption`` then rejects the captions that hold them, one by one)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if skip_bad:
            return data.decode("utf-8-sig", errors="replace")
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{name}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); expected UTF-8 text"
        ) from None


@dataclass
class FileImageDataset(ImageTextDataset):
    """Images read from files; ``paths[i]`` is image ``i`` (absolute or relative to the cwd)."""

    paths: list[str] = field(default_factory=list)

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], self.paths[index], index)


class Collector:
    """Builds the image/caption lists of a split from rows, in first-seen image order.

    Image paths are relative to ``root``; one that leads outside it (``..``, an absolute path, a
    symlink) is refused unless ``allow_outside_root``, so a captions file cannot make us read and
    embed any file on the machine.
    """

    def __init__(self, skip_bad: bool, root: Path, allow_outside_root: bool = False):
        self.skip_bad = skip_bad
        self.root = root
        self.allow_outside_root = allow_outside_root
        self.images: dict[str, tuple[str, str]] = {}  # key -> (path, where first seen)
        self.captions: dict[str, list[str]] = {}
        self.skipped: list[dict] = []
        self._refused: set[str] = set()

    def bad(self, error: DataError, **record: object) -> None:
        """Raise ``error``, or record it and carry on when skipping bad samples."""
        if not self.skip_bad:
            raise error
        self.skipped.append({**record, "reason": str(error)})

    def _image_problem(self, rel: str, path: str) -> str | None:
        if not self.allow_outside_root and not is_inside(self.root, path):
            return (
                f"image path {rel!r} leads outside the dataset root {self.root}; set the option root=FOLDER "
                "to the folder that holds the images, or allow_outside_root=1 if that is intended"
            )
        if not os.path.isfile(path):
            return f"image file not found: {path}"
        return None

    def add(self, rel: str, text: object, where: str, caption_where: str | None = None) -> None:
        """One (image, caption) row; ``rel`` is the image path under the root, ``where`` names the row,
        ``caption_where`` the caption field."""
        if rel in self._refused:
            return
        if rel not in self.images:
            path = str(self.root / rel)
            problem = self._image_problem(rel, path)
            if problem is not None:
                self._refused.add(rel)
                self.bad(DataError(f"{where}: {problem}"), key=rel, where=where)
                return
            self.images[rel] = (path, where)
            self.captions[rel] = []
        try:
            self.captions[rel].append(check_caption(text, caption_where or where))
        except DataError as e:
            self.bad(e, key=rel, where=caption_where or where)

    def build(self, cls: type[FileImageDataset], spec: str, split: str, **extra: object) -> FileImageDataset:
        keys, paths, captions, owner = [], [], [], []
        for key, (path, where) in self.images.items():
            caps = self.captions[key]
            if not caps:  # every caption of this image was bad and skipped
                self.skipped.append({"key": key, "where": where, "reason": f"{where}: no usable caption"})
                continue
            for c in caps:
                captions.append(c)
                owner.append(len(keys))
            keys.append(key)
            paths.append(path)
        if not keys:
            raise DataError(f"dataset {spec!r} split {split!r}: no usable image-caption pairs")
        return cls(
            spec=spec,
            split=split,
            image_keys=keys,
            captions=captions,
            caption_image_index=np.asarray(owner, dtype=np.int64),
            skipped=self.skipped,
            paths=paths,
            **extra,
        )
