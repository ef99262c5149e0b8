"""Feature-cache scale ladder: does opening and reading the random-access cache stay flat with its size?

For each size it writes a synthetic cache through the real writer (``write_feature_rows``: fp16
shards, records, manifest), then in a fresh process opens it and measures open time, open files,
peak RSS after opening, after ``--gathers`` training-batch gathers (``--batch`` images and their
captions, random ids) and after the schedule's first epoch permutation, and the time per gather.
Each cache is deleted before the next is built. Prints a table and writes it to ``--doc``.

    python tools/cache_ladder.py --sizes 100000,300000,1000000,3000000,10000000 --dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from edge_msd.data.base import ImageTextDataset

CAPTIONS = 2  # per image


class _Names(Sequence):
    """``prefix0, prefix1, ...`` made on access: a synthetic split's keys/captions cost no memory."""

    def __init__(self, prefix: str, n: int) -> None:
        self.prefix, self.n = prefix, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [f"{self.prefix}{j}" for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return f"{self.prefix}{i}"


class SyntheticSplit(ImageTextDataset):
    def __init__(self, n: int) -> None:
        super().__init__(spec=f"synthetic:{n}", split="train", image_keys=_Names("img", n),  # type: ignore[arg-type]
                         captions=_Names("cap", CAPTIONS * n),  # type: ignore[arg-type]
                         caption_image_index=np.repeat(np.arange(n, dtype=np.int64), CAPTIONS))

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError("a synthetic split has no images")

    def fingerprint(self) -> str:  # the spec names it: hashing every synthetic key would only cost time
        return f"{self.spec}:{CAPTIONS}".encode().hex().ljust(64, "0")


def build(out: Path, n: int, dim: int) -> float:
    from edge_msd.teachers.cache import write_feature_rows

    def rows(kind: str, a: int, b: int) -> np.ndarray:
        rng = np.random.default_rng([0 if kind == "image" else 1, a])
        return rng.standard_normal((b - a, dim), np.float32)

    t = time.perf_counter()
    write_feature_rows("synthetic-teacher", SyntheticSplit(n), out, dim, rows)
    return time.perf_counter() - t


def _rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _anon_mb() -> float:
    """Private (anonymous) memory now: RSS also counts the pages of the mapped cache file that a gather
    touched, which are page cache, shared and dropped by the kernel under pressure."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return -1.0
    line = next(x for x in status.read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) / 2**10


def _fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1


def measure(path: Path, batch: int, gathers: int) -> dict:
    """In this (fresh) process: open the cache, gather batches, draw one epoch's permutation."""
    from edge_msd.distill.schedule import Schedule
    from edge_msd.teachers.cache import FeatureCache

    res = {"rss_start_mb": _rss_mb(), "fds_start": _fds(), "anon_start_mb": _anon_mb()}
    t = time.perf_counter()
    cache = FeatureCache.open(path)
    res.update(open_s=time.perf_counter() - t, rss_open_mb=_rss_mb(), fds_open=_fds())
    rng = np.random.default_rng(0)
    times = []
    for _ in range(gathers):
        imgs = rng.integers(0, cache.n_images, batch)
        caps = rng.integers(0, cache.n_captions, batch * CAPTIONS)
        t = time.perf_counter()
        cache.image(imgs), cache.text(caps)
        times.append(time.perf_counter() - t)
    res.update(gather_ms=1e3 * float(np.median(times)), rss_gather_mb=_rss_mb(), fds_gather=_fds(),
               anon_gather_mb=_anon_mb())
    t = time.perf_counter()
    schedule = Schedule(cache.valid_images, cache.caption_image_index, batch, CAPTIONS, 0)
    schedule.step(0)
    res.update(perm_s=time.perf_counter() - t, rss_perm_mb=_rss_mb(), anon_perm_mb=_anon_mb())
    return res


COLUMNS = [("rows", "n"), ("shards/modality", "shards"), ("build s", "build_s"), ("open ms", "open_ms"),
           ("fds open", "fds_open"), ("fds after gathers", "fds_gather"), ("RSS start MB", "rss_start_mb"),
           ("RSS open MB", "rss_open_mb"), ("RSS gathers MB", "rss_gather_mb"),
           ("anon start MB", "anon_start_mb"), ("anon gathers MB", "anon_gather_mb"),
           ("gather ms/batch", "gather_ms"), ("RSS +schedule MB", "rss_perm_mb"),
           ("anon +schedule MB", "anon_perm_mb"), ("schedule s", "perm_s")]
BEGIN, END = "<!-- ladder:begin -->", "<!-- ladder:end -->"


def _cells(rows: list[dict]) -> list[list[str]]:
    return [[f"{r[k]:.2f}" if isinstance(r[k], float) else f"{r[k]:,}" for _, k in COLUMNS] for r in rows]


def _write_doc(doc: Path, rows: list[dict], title: str, command: str) -> None:
    """Put the table between the ladder markers of ``doc`` (the prose around it is kept)."""
    block = "\n".join([BEGIN, f"{title}; `{command}`", "",
                       "| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS),
                       *("| " + " | ".join(c) + " |" for c in _cells(rows)), END])
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += ("\n" if text else "") + block + "\n"
    doc.write_text(text, encoding="utf-8")


def _child(*args: str) -> dict:
    """Run this script with ``args`` in a fresh process; its last stdout line is its JSON result."""
    child = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,300000,1000000,3000000,10000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--gathers", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="where the caches are built (default: a temp dir)")
    ap.add_argument("--doc", type=Path, default=None, help="write the table (markdown) into this file")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child processes: the parent stays
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # small, and ru_maxrss of a child
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)  # starts from its parent's peak
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch, args.gathers)))
        return 0
    if args.build:
        print(json.dumps({"build_s": build(args.build, args.rows, args.dim)}))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="cache-ladder-", dir=args.dir))
    need = max(sizes) * args.dim * 2 * (1 + CAPTIONS) * 2.2 + max(sizes) * 24  # shards + joined + index
    free = shutil.disk_usage(root).free
    if need > free:
        raise SystemExit(f"{root}: {free / 2**30:.1f} GiB free, the largest cache needs "
                         f"{need / 2**30:.1f} GiB; lower --dim or --sizes")
    console, rows = Console(), []
    try:
        for n in sizes:
            out = root / f"c{n}"
            build_s = _child("--build", str(out), "--rows", str(n), "--dim", str(args.dim))["build_s"]
            res = _child("--measure", str(out), "--batch", str(args.batch), "--gathers", str(args.gathers))
            shards = len(json.loads((out / "manifest.json").read_text())["shards"]["image"])
            rows.append({"n": n, "shards": shards, "build_s": build_s, **res, "open_ms": 1e3 * res["open_s"]})
            console.print(f"{n:,} rows: open {1e3 * res['open_s']:.1f} ms, gather {res['gather_ms']:.2f} ms")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    title = (f"feature cache ladder: dim {args.dim}, {CAPTIONS} captions/image, batch {args.batch} images + "
             f"{args.batch * CAPTIONS} captions, {args.gathers} gathers")
    table = Table(title=title)
    for name, _ in COLUMNS:
        table.add_column(name, justify="right")
    for cells in _cells(rows):
        table.add_row(*cells)
    console.print(table)
    if args.doc:
        command = "python tools/cache_ladder.py " + " ".join(argv if argv is not None else sys.argv[1:])
        _write_doc(args.doc, rows, title, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
