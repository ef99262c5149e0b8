"""``csv:FILE.csv`` / ``csv:FILE.tsv``: the open_clip CSV convention (one row per image-caption pair).

Options: ``img_key`` (column of image paths, default ``filepath``), ``caption_key`` (default
``title``), ``sep`` (default ``,`` for .csv, tab otherwise), ``root`` (folder that relative image
paths start from; default the CSV's folder), ``allow_outside_root`` (read image paths that lead
outside ``root``: ``..``, absolute paths, symlinks; refused by default), ``split_key`` (column holding
each row's split; when the file has it, rows are filtered by it, otherwise the whole file is the split
asked for).
``{split}`` in the path is replaced by the split name (``csv:/data/{split}.csv``). Rows with the
same image path form one image with several captions.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from edge_msd.data.files import Collector, FileImageDataset, decode_utf8
from edge_msd.data.spec import Spec, check_split, require_path, resolve_options
from edge_msd.errors import ConfigError, DataError

DEFAULTS = {
    "img_key": "filepath",
    "caption_key": "title",
    "sep": None,
    "root": None,
    "split_key": "split",
    "allow_outside_root": False,
}
STANDARD_SPLITS = ["train", "val", "test"]


def open_csv(spec: Spec, split: str, skip_bad: bool) -> FileImageDataset:
    opts = resolve_options(spec, DEFAULTS)
    path = Path(require_path(spec, "/data/train.csv").replace("{split}", split))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: CSV file not found (dataset spec {spec.text!r})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; expected a .csv or .tsv file") from None
    sep = opts["sep"] if opts["sep"] is not None else ("," if path.suffix.lower() == ".csv" else "\t")
    if sep in ("\\t", "tab"):
        sep = "\t"
    if len(sep) != 1:
        raise ConfigError(f"dataset spec {spec.text!r}: option 'sep': expected one character, got {sep!r}")
    text = decode_utf8(data, str(path), skip_bad)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    columns = reader.fieldnames or []
    for option in ("img_key", "caption_key"):
        if opts[option] not in columns:
            found = ", ".join(repr(c) for c in columns) or "(none: the file is empty)"
            raise DataError(
                f"{path}:1: missing column {opts[option]!r} (option {option}); columns found: {found}"
                + (
                    ""
                    if sep != "," or len(columns) != 1 or "\t" not in columns[0]
                    else "; is it a TSV (?sep=tab)?"
                )
            )
    has_split = opts["split_key"] in columns
    root = Path(opts["root"]) if opts["root"] else path.parent
    rows = Collector(skip_bad, root, opts["allow_outside_root"])
    splits_seen: set[str] = set()
    try:
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if has_split:
                row_split = (row.get(opts["split_key"]) or "").strip()
                splits_seen.add(row_split)
                if row_split != split:
                    continue
            rel = row.get(opts["img_key"])
            if rel is None or not rel.strip() or "\ufffd" in rel:
                problem = "not valid UTF-8" if rel and "\ufffd" in rel else "empty"
                rows.bad(
                    DataError(f"{where}: column {opts['img_key']!r}: image path is {problem}"), where=where
                )
                continue
            caption_where = f"{where}: column {opts['caption_key']!r}"
            rows.add(rel.strip(), row.get(opts["caption_key"]), where, caption_where)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if has_split:
        check_split(spec, split, sorted(splits_seen))
    else:
        check_split(spec, split, STANDARD_SPLITS)
    return rows.build(FileImageDataset, spec.text, split)
