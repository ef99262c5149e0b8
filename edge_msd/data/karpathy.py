"""``coco:dataset_coco.json`` and ``flickr30k:dataset_flickr30k.json``: Karpathy-split caption files.

Shape read: ``{"images": [{"filename": str, "filepath": str (COCO), "split": str,
"sentences": [{"raw": str}, ...]}, ...]}``. Option ``root``: the image folder (default: the JSON's
folder); an image's path is ``root/filepath/filename`` (COCO) or ``root/filename`` (Flickr30k), and
one that leads outside ``root`` is refused unless ``allow_outside_root=1``.
Splits: ``train`` (COCO: train + restval), ``val``, ``test``.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_msd.data.files import Collector, FileImageDataset, decode_utf8
from edge_msd.data.spec import Spec, check_split, require_path, resolve_options
from edge_msd.errors import DataError

SPLITS = ["train", "val", "test"]
# Karpathy split names that make up each split we offer
_MEMBERS = {
    "coco": {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}},
    "flickr30k": {"train": {"train"}, "val": {"val"}, "test": {"test"}},
}


def _expect(cond: bool, where: str, expected: str, got: object) -> None:
    if not cond:
        raise DataError(f"{where}: expected {expected}, got {type(got).__name__} {str(got)[:60]!r}")


def open_karpathy(spec: Spec, split: str, skip_bad: bool) -> FileImageDataset:
    opts = resolve_options(spec, {"root": None, "allow_outside_root": False})
    path = Path(require_path(spec, f"/data/dataset_{spec.kind}.json"))
    check_split(spec, split, SPLITS)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: Karpathy JSON not found (dataset spec {spec.text!r})") from None
    try:
        doc = json.loads(decode_utf8(data, str(path), skip_bad=False))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    name = str(path)
    _expect(
        isinstance(doc, dict) and isinstance(doc.get("images"), list),
        f"{name}: images",
        "a list under the key 'images'",
        doc.get("images") if isinstance(doc, dict) else doc,
    )
    root = Path(opts["root"]) if opts["root"] else path.parent
    members = _MEMBERS[spec.kind][split]
    rows = Collector(skip_bad, root, opts["allow_outside_root"])
    for i, img in enumerate(doc["images"]):
        at = f"{name}: images[{i}]"
        _expect(isinstance(img, dict), at, "an object", img)
        for key in ("filename", "split"):
            _expect(
                isinstance(img.get(key), str) and img.get(key),
                f"{at}.{key}",
                "a non-empty string",
                img.get(key),
            )
        filepath = img.get("filepath", "")
        _expect(isinstance(filepath, str), f"{at}.filepath", "a string", filepath)
        sentences = img.get("sentences")
        _expect(isinstance(sentences, list), f"{at}.sentences", "a list", sentences)
        for j, s in enumerate(sentences):
            _expect(isinstance(s, dict) and "raw" in s, f"{at}.sentences[{j}]", "an object with 'raw'", s)
        if img["split"] not in members:
            continue
        rel = f"{filepath}/{img['filename']}" if filepath else img["filename"]
        if not sentences:
            rows.bad(
                DataError(f"{at}.sentences: expected at least one caption, got an empty list"),
                key=rel,
                where=f"{at}.sentences",
            )
            continue
        for j, s in enumerate(sentences):
            rows.add(rel, s["raw"], f"{at}.filename", f"{at}.sentences[{j}].raw")
    return rows.build(FileImageDataset, spec.text, split)
