"""The device's own preprocessing of raw inputs (edge_msd/bench/raw.py): decode + resize + crop equal to
open_clip's eval transform on real photos, the draft-mode drift bounded, token diffs, the report rows."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_msd.bench import raw
from edge_msd.bench.report import format_table, raw_rows
from edge_msd.contract.raw import pack_files

MODES = [((224, 224), "shortest"), ((64, 64), "shortest"), ((96, 128), "shortest"), ((96, 128), "longest"),
         ((256, 256), "longest"), ((64, 80), "squash")]


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """The two real JPEG photos scikit-learn ships (427×640)."""
    from sklearn.datasets import load_sample_images

    return [Path(f).read_bytes() for f in load_sample_images().filenames]


def _host(image: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    from open_clip.transform import image_transform

    from edge_msd.distill.images import split_preprocess

    return split_preprocess(image_transform(size, False, resize_mode=mode))[0](image)


def _prep(size: tuple[int, int], mode: str) -> dict:
    return {"size": list(size), "resize": "bicubic", "resize_mode": mode}


@pytest.mark.parametrize(("size", "mode"), MODES)
def test_full_decode_equals_open_clip_eval_transform(photos, size, mode):
    for data in photos:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        png = io.BytesIO()
        image.save(png, format="PNG")  # lossless, so no draft: the geometry and resampling alone
        host = _host(image, size, mode)
        assert np.array_equal(raw.decode_image(png.getvalue(), _prep(size, mode)), host)
        assert np.array_equal(raw.decode_image(data, _prep(size, mode), draft=0), host)


@pytest.mark.parametrize(("size", "mode"), MODES)
def test_jpeg_draft_decode_close_to_the_host(photos, size, mode):
    """DCT-scaled decoding is the one step that differs: measured here at mean ≤ 2.1, max ≤ 47 of 255
    (china.jpg to 96×128); the recall it costs is what the bench report shows."""
    for data in photos:
        host = _host(Image.open(io.BytesIO(data)).convert("RGB"), size, mode)
        diff = np.abs(raw.decode_image(data, _prep(size, mode)).astype(int) - host)
        assert diff.mean() < 2.5 and diff.max() < 64, (size, mode, diff.mean(), diff.max())


def test_decode_images_stacks_uint8_at_model_size(photos):
    out = raw.decode_images(photos, _prep((96, 128), "shortest"))
    assert out.shape == (2, 96, 128, 3) and out.dtype == np.uint8


def test_bad_resize_mode_named():
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(Exception, match="resize_mode 'fill'"):
        raw.decode_image(png.getvalue(), _prep((4, 4), "fill"))


def test_token_diffs_counts_ids_and_rows():
    host = np.array([[1, 5, 2, 0], [1, 6, 7, 2]], np.int32)
    device = host.copy()
    device[1, 1:3] = [8, 9]
    assert raw.token_diffs(device, host) == {"ids": 2, "rows": 1, "n_rows": 2}
    assert raw.token_diffs(host[:, :3], host)["shape_differs"] == 1


def _set(photos: list[bytes]) -> dict[str, np.ndarray]:
    return {"images": np.zeros((2, 4, 4, 3), np.uint8), "tokens": np.zeros((2, 4), np.int32),
            "texts": np.array(["a", "b"]), **pack_files(photos)}


def test_raw_reason_old_bundle_and_missing_pillow(photos, monkeypatch):
    old = {k: v for k, v in _set(photos).items() if k not in ("image_bytes", "image_offsets")}
    assert raw.raw_reason(old) == raw.NOT_IN_BUNDLE and raw.raw_reason(None) == raw.NOT_IN_BUNDLE
    assert raw.raw_reason(_set(photos)) is None
    monkeypatch.setattr(raw, "pillow_missing", lambda: "Pillow is not installed (pip install Pillow)")
    assert raw.raw_reason(_set(photos)).startswith("Pillow is not installed")


def test_report_rows_measured_and_not_in_bundle():
    measured = {"status": "measured", "file_bytes": 2_500_000, "decode_ms_per_image": 1.25,
                "token_diffs": {"ids": 0, "rows": 0, "n_rows": 40}, "mean_R@1_host": 80.0,
                "mean_R@1_device": 79.75, "delta_mean_R@1": -0.25,
                "image_cosine": {"mean_cos": 0.9995, "min_cos": 0.99, "n": 10}}
    report = {"raw_inputs": {"images": "jpeg q95 4:4:4", "sets": {"eval": measured,
                                                                   "probe": {"status": raw.NOT_IN_BUNDLE}}}}
    rows = raw_rows(report)
    assert rows[0] == ["eval", "jpeg q95 4:4:4", "2.50", "1.250", "0 (0 of 40 rows)", "80.00", "79.75",
                       "-0.25", "0.99950 / 0.99000"]
    assert rows[1][:2] == ["probe", "not in bundle"]
    assert "raw inputs: decoded and tokenized here" in format_table(report)


def test_unusable_tokenizer_skips_the_raw_path_with_its_reason(photos, tmp_path):
    from edge_msd.contract.reading import Bundle

    sets = {"eval": _set(photos), "probe": None}
    out = raw.raw_inputs(Bundle(tmp_path, {}, ""), sets)
    assert out["sets"]["eval"]["status"].startswith("bundle tokenizer unusable:")
    assert out["sets"]["probe"]["status"] == raw.NOT_IN_BUNDLE and "eval_raw" not in sets
