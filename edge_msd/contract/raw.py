"""Raw inputs in a bundle's probe/eval sets: the images as encoded files, packed without pickles.

Files are one uint8 blob plus int64 offsets (file ``i`` is ``blob[offsets[i]:offsets[i + 1]]``), so
``np.load(allow_pickle=False)`` reads them; the captions are the sets' ``texts`` (a fixed-width unicode
array). The export writes these arrays (``pack_files``), the benchmark decodes them (edge_msd/bench/raw.py).
"""

from __future__ import annotations

import numpy as np

from edge_msd.errors import ArtifactError

IMAGE_BYTES = "image_bytes"  # uint8 (B,): every image file, one after the other
IMAGE_OFFSETS = "image_offsets"  # int64 (N + 1,): where each file starts, then the blob's length
TEXTS = "texts"  # str (M,): the captions the host tokenized into ``tokens``
JPEG_QUALITY = 95  # what the export re-encodes images at when the dataset has no files of its own


def pack_files(files: list[bytes]) -> dict[str, np.ndarray]:
    """The set's arrays for ``files`` (encoded images, in image order)."""
    offsets = np.zeros(len(files) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(f) for f in files])
    blob = np.frombuffer(b"".join(files), dtype=np.uint8) if files else np.zeros(0, np.uint8)
    return {IMAGE_BYTES: blob, IMAGE_OFFSETS: offsets}


def has_files(data: dict[str, np.ndarray]) -> bool:
    return IMAGE_BYTES in data and IMAGE_OFFSETS in data


def unpack_files(data: dict[str, np.ndarray], where: str) -> list[bytes]:
    """The encoded files of a set; offsets that do not fit the blob or the images: an error naming
    ``where``."""
    blob, off = data[IMAGE_BYTES], data[IMAGE_OFFSETS]
    n = len(data["images"]) if "images" in data else len(off) - 1
    if (blob.dtype != np.uint8 or off.ndim != 1 or len(off) != n + 1 or off[0] != 0
            or off[-1] != len(blob) or np.any(np.diff(off) < 0)):
        raise ArtifactError(f"{where}: {IMAGE_OFFSETS} must rise from 0 to the length of {IMAGE_BYTES} "
                            f"({len(blob)}) in {n + 1} steps (one file per image)")
    raw = blob.tobytes()
    return [raw[off[i]:off[i + 1]] for i in range(n)]


def first_files(data: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The packed files of the first ``n`` images only (an eval subset)."""
    off = data[IMAGE_OFFSETS][: n + 1]
    return {IMAGE_BYTES: data[IMAGE_BYTES][: int(off[-1])], IMAGE_OFFSETS: off}
