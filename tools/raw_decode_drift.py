#!/usr/bin/env python3
"""The device decode of a bundle's eval images at several JPEG draft factors, side by side in one process
(rounds interleaved): per-image decode time (resize and crop included) and the pixel difference against
the host-prepared ``images``. Prints one JSON object.

    python tools/raw_decode_drift.py runs/export/onnx --drafts 0 1 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_msd.bench.raw import decode_images  # noqa: E402
from edge_msd.contract.format import EVALSET  # noqa: E402
from edge_msd.contract.raw import unpack_files  # noqa: E402
from edge_msd.contract.reading import open_bundle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="bundle folder with raw sets")
    ap.add_argument("--drafts", type=int, nargs="+", default=[0, 1, 2], help="draft factors (0: full decode)")
    ap.add_argument("--rounds", type=int, default=5, help="decodes of the whole set per factor")
    args = ap.parse_args()
    bundle = open_bundle(args.bundle)
    data = bundle.load_npz(EVALSET)
    files, prep = unpack_files(data, str(bundle.root / EVALSET)), bundle.manifest["preprocessing"]
    times: dict[int, list[float]] = {d: [] for d in args.drafts}
    for _ in range(args.rounds):
        for d in args.drafts:
            t0 = time.perf_counter()
            decode_images(files, prep, d)
            times[d].append(1e3 * (time.perf_counter() - t0) / len(files))
    out = {}
    for d in args.drafts:
        diff = np.abs(decode_images(files, prep, d).astype(np.int16) - data["images"].astype(np.int16))
        out[str(d)] = {"ms_per_image_median": float(np.median(times[d])),
                       "pixel_mean_abs": float(diff.mean()), "pixel_max_abs": int(diff.max())}
    print(json.dumps({"bundle": str(bundle.root), "images": len(files), "encoding":
                      bundle.manifest["data"]["raw"]["images"], "drafts": out}, indent=2))


if __name__ == "__main__":
    main()
