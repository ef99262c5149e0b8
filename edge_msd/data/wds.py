"""``wds:/data/{000000..000099}.tar``: webdataset tar shards with random access.

A sample is the group of tar members sharing a key (the member path up to the first dot of its
base name): one image (jpg/jpeg/png/webp/bmp) and one ``txt`` caption. Opening a split scans each
shard's member headers once with ``tarfile`` and keeps (shard, byte offset, size) per image, so
``load_image(i)`` reads just those bytes; captions are read during the scan. Shards must be
uncompressed tar (compressed tar has no random access). ``{split}`` in the path is replaced by the
split name, so one spec can serve every split (``wds:/data/{split}/{0000..0009}.tar``); without it
the shards are the split asked for.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edge_msd.data.base import ImageTextDataset
from edge_msd.data.files import check_caption, decode_image, decode_utf8
from edge_msd.data.spec import Spec, check_split, require_path, resolve_options
from edge_msd.errors import BadSampleError, ConfigError, DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
STANDARD_SPLITS = ["train", "val", "test"]
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` → a00bx, a00by, a01bx, ...; numeric ranges keep the first bound's width."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise ConfigError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(rng.group(1))
        items = [f"{k:0{width}d}" for k in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ConfigError(f"shard pattern {pattern!r}: expected {{A..B}} or {{x,y,...}}, got {{{body}}}")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [head + item + rest for item in items for rest in expand_braces(tail)]


@dataclass
class WebDataset(ImageTextDataset):
    """Random-access view of tar shards; ``locations[i]`` = (shard index, data offset, size)."""

    shards: list[str] = field(default_factory=list)
    locations: list[tuple[int, int, int]] = field(default_factory=list)

    def load_image(self, index: int) -> Image.Image:
        shard, offset, size = self.locations[index]
        where = f"{self.shards[shard]}: {self.image_keys[index]}"
        try:
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise BadSampleError(f"{where}: cannot read shard ({e})", image_index=index) from None
        if len(data) != size:
            raise BadSampleError(
                f"{where}: shard truncated (expected {size} bytes, found {len(data)})", image_index=index
            )
        return decode_image(data, where, index)


def _scan(shard: Path, skip_bad: bool, skipped: list[dict]) -> dict[str, dict]:
    """key -> {"image": (offset, size, name), "txt": bytes} for one shard, in member order."""
    samples: dict[str, dict] = {}
    try:
        file_size = shard.stat().st_size
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > file_size:  # tarfile stops quietly at a cut-off member
                    raise tarfile.ReadError(f"member {m.name!r} cut off: the shard ends at byte {file_size}")
                folder, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                if ext in IMAGE_EXTS:
                    samples.setdefault(key, {})["image"] = (m.offset_data, m.size, m.name)
                elif ext == "txt":
                    reader = tf.extractfile(m)
                    samples.setdefault(key, {})["txt"] = reader.read() if reader else b""
    except FileNotFoundError:
        raise DataError(f"{shard}: shard not found") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        error = DataError(f"{shard}: not a readable uncompressed tar shard ({e}); expected a webdataset .tar")
        if not skip_bad:
            raise error from None
        # keep the samples before the damage; the partly read last one is checked like any other
        skipped.append({"shard": str(shard), "reason": str(error)})
    return samples


def open_wds(spec: Spec, split: str, skip_bad: bool) -> WebDataset:
    resolve_options(spec, {})
    check_split(spec, split, STANDARD_SPLITS)
    shards = [
        Path(p)
        for p in expand_braces(require_path(spec, "/data/{000000..000009}.tar").replace("{split}", split))
    ]
    keys: list[str] = []
    captions: list[str] = []
    owner: list[int] = []
    locations: list[tuple[int, int, int]] = []
    skipped: list[dict] = []
    for s, shard in enumerate(shards):
        for key, sample in _scan(shard, skip_bad, skipped).items():
            where = f"{shard}: sample {key!r}"
            problem = None
            if "image" not in sample:
                problem = f"{where}: no image member (expected one of .{', .'.join(IMAGE_EXTS)})"
            elif "txt" not in sample:
                problem = f"{where}: no .txt caption member"
            else:
                try:
                    text = check_caption(
                        decode_utf8(sample["txt"], f"{shard}: {key}.txt", skip_bad), f"{where}: {key}.txt"
                    )
                except DataError as e:
                    problem = str(e)
            if problem is not None:
                if not skip_bad:
                    raise DataError(problem)
                skipped.append({"key": f"{shard.name}/{key}", "where": str(shard), "reason": problem})
                continue
            offset, size, _ = sample["image"]
            owner.append(len(keys))
            keys.append(f"{shard.name}/{key}")
            captions.append(text)
            locations.append((s, offset, size))
    if not keys:
        raise DataError(f"dataset {spec.text!r} split {split!r}: no usable samples in {len(shards)} shard(s)")
    return WebDataset(
        spec=spec.text,
        split=split,
        image_keys=keys,
        captions=captions,
        caption_image_index=np.asarray(owner, dtype=np.int64),
        skipped=skipped,
        shards=[str(p) for p in shards],
        locations=locations,
    )
