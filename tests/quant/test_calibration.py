"""Calibration sets never pick a bad image: ids from the feature cache, or found by decoding; all counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edge_msd.cli import main
from edge_msd.data.base import ImageTextDataset
from edge_msd.errors import BadSampleError, DataError
from edge_msd.quant.calibration import (
    build_calibration_set,
    cache_bad_images,
    calibration_batches,
    load_calibration_set,
)
from edge_msd.teachers.cache import build_feature_cache

REPO = Path(__file__).resolve().parents[2]


class Images(ImageTextDataset):
    """n noise images, one caption each; ``bad`` ones raise BadSampleError; counts decodes."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__(spec="tiny:calib", split="train", image_keys=[f"img{i}" for i in range(n)],
                         captions=[f"caption {i}" for i in range(n)],
                         caption_image_index=np.arange(n, dtype=np.int64))
        self.bad, self.decoded = bad, 0

    def load_image(self, index: int) -> Image.Image:
        self.decoded += 1
        if index in self.bad:
            raise BadSampleError(f"img{index}: truncated", image_index=index)
        return Image.fromarray(np.full((8, 8, 3), index, dtype=np.uint8))


def test_bad_draws_are_replaced_within_their_bin_and_listed():
    ds = Images(8, bad={2})  # 4 bins of 2 images: image 2 can only be replaced by image 3
    sets = [build_calibration_set(ds, 4, seed=s, min_samples=4) for s in range(8)]
    assert all(cs.n == 4 and 2 not in cs.image_ids for cs in sets)
    hit = [cs for cs in sets if cs.skipped_images]
    assert hit and all(cs.image_ids[1] == 3 for cs in hit)
    assert hit[0].skipped_images == [{"image_index": 2, "key": "img2", "reason": "img2: truncated"}]
    clean = [cs for cs in sets if not cs.skipped_images]
    assert clean and all(cs == build_calibration_set(Images(8, set()), 4, seed=cs.seed, min_samples=4)
                         for cs in clean)  # without bad images the draw is what it always was


def test_cache_ids_spare_decoding_and_too_few_usable_is_an_error():
    ds = Images(8, bad=set())
    cs = build_calibration_set(ds, 4, seed=0, min_samples=2, bad_images={0, 1, 2, 3})  # 2 whole bins
    assert ds.decoded == 0 and cs.n == 2 and cs.image_ids[0] in (4, 5) and cs.image_ids[1] in (6, 7)
    assert {s["reason"] for s in cs.skipped_images} == {"marked bad by the feature cache"}
    with pytest.raises(DataError, match="only 2 usable images.*4 bad.*at least 3"):
        build_calibration_set(ds, 4, seed=0, min_samples=3, bad_images={0, 1, 2, 3})


def test_calibration_batches_leave_out_an_image_that_broke_later():
    ds = Images(8, bad=set())
    cs = build_calibration_set(ds, 4, seed=0, min_samples=4)
    ds.bad = {cs.image_ids[1]}
    skipped: list[dict] = []
    batches = list(calibration_batches(cs, ds, lambda im: torch.zeros(3, 8, 8),
                                       lambda texts: torch.zeros(len(texts), 4), 3, skipped=skipped))
    assert [len(x) for x, _ in batches] == [2, 1] and [len(t) for _, t in batches] == [2, 1]
    assert [s["image_index"] for s in skipped] == [cs.image_ids[1]]


class Teacher:
    id, embed_dim = "calib-teacher", 4

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).mean(dim=(0, 1))[:3].repeat(2)[:4]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 1.0, 2.0, 3.0] for t in texts])

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x + 1, dim=-1)

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(t, dim=-1)


def test_cache_bad_images_reads_a_skip_bad_cache_of_the_same_data(tmp_path):
    ds = Images(8, bad={5})
    build_feature_cache(Teacher(), ds, tmp_path / "train", skip_bad=True, progress=False)
    assert cache_bad_images(tmp_path / "train", ds) == {5}
    assert cache_bad_images(tmp_path / "none", ds) is None
    other = Images(9, bad=set())
    assert cache_bad_images(tmp_path / "train", other) is None  # another dataset: says nothing


def test_manifests_written_before_the_bad_image_fields_still_load():
    cs = load_calibration_set(REPO / "calibration" / "demo-scenes.json")
    assert cs.skipped_images == [] and cs.dropped_when_read == 0


def test_cli_calibrate_on_a_csv_with_a_corrupt_image_and_a_missing_file(tmp_path, monkeypatch):
    rows = ["filepath,title"]
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,photo {i}")
    (tmp_path / "1.png").write_bytes(b"\x89PNG broken")
    rows.append("gone.png,not on disk")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)  # no feature cache here: the drawn images are decoded
    out = tmp_path / "cal.json"
    r = CliRunner().invoke(main, ["calibrate", "--data", f"csv:{tmp_path / 'pairs.csv'}", "--n", "4",
                                  "--min-samples", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads(out.read_text())
    assert 1 not in manifest["image_ids"] and manifest["dropped_when_read"] == 1
    assert manifest["n"] == len(manifest["image_ids"]) >= 3
