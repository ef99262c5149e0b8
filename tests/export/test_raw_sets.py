"""Raw inputs in the bundle's probe/eval sets (edge_msd/contract/raw.py, export/bundle.py): encoded image
files and caption strings, pickle-free, hashed like every bundle file, and benched on the device."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import _clean_env
from export_helpers import CAPTIONS, make_tiny_student, tiny_dataset
from PIL import Image

from edge_msd.artifacts import file_hashes
from edge_msd.bench import raw
from edge_msd.bench.options import BenchOptions
from edge_msd.bench.report import format_table
from edge_msd.bench.run import eval_subset, run_bench
from edge_msd.contract.raw import IMAGE_BYTES, IMAGE_OFFSETS, first_files, pack_files, unpack_files
from edge_msd.contract.reading import open_bundle
from edge_msd.data.files import FileImageDataset
from edge_msd.errors import ArtifactError
from edge_msd.export.bundle import ExportConfig, export_bundle, image_file, image_files_kind


def test_packed_files_round_trip_without_pickle(tmp_path):
    files = [b"\xff\xd8first", b"", b"third file"]
    np.savez(tmp_path / "s.npz", images=np.zeros((3, 2, 2, 3), np.uint8), texts=np.array(["a", "bé"]),
             **pack_files(files))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    assert unpack_files(data, "s.npz") == files and data["texts"].tolist() == ["a", "bé"]
    assert unpack_files({**data, **first_files(data, 2), "images": data["images"][:2]}, "s") == files[:2]


def test_offsets_that_do_not_fit_are_named():
    data = {"images": np.zeros((2, 1, 1, 3), np.uint8), **pack_files([b"ab", b"cd"])}
    data[IMAGE_OFFSETS] = np.array([0, 3, 2])
    with pytest.raises(ArtifactError, match="s.npz: image_offsets must rise from 0"):
        unpack_files(data, "s.npz")
    with pytest.raises(ArtifactError, match="one file per image"):
        unpack_files({**data, IMAGE_OFFSETS: np.array([0, 4])}, "s.npz")


def test_image_file_re_encodes_jpeg_without_files():
    ds = tiny_dataset()
    data = image_file(ds, 0)
    assert data[:2] == b"\xff\xd8" and image_files_kind(ds) == "jpeg q95 4:4:4"
    diff = np.abs(np.asarray(Image.open(io.BytesIO(data))).astype(int) - np.asarray(ds.load_image(0)))
    assert diff.mean() < 1.5  # quality 95, no chroma subsampling


def _file_dataset(folder: Path) -> FileImageDataset:
    """The two real JPEG photos scikit-learn ships and six drawn PNGs, as files on disk."""
    from sklearn.datasets import load_sample_images

    folder.mkdir()
    paths = [shutil.copy(f, folder) for f in load_sample_images().filenames]
    drawn = tiny_dataset()
    for i in range(6):
        paths.append(str(folder / f"drawn{i}.png"))
        drawn.load_image(i).save(paths[-1])
    return FileImageDataset(spec="files", split="test", image_keys=[Path(p).name for p in paths],
                            captions=CAPTIONS, caption_image_index=np.arange(8, dtype=np.int64),
                            paths=[str(p) for p in paths])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    student = make_tiny_student(root / "student")
    cfg = ExportConfig(target="onnx", student=str(student), precision="", out=str(root / "onnx"),
                       probe_images=4)
    export_bundle(cfg, dataset=_file_dataset(root / "photos"))
    return root / "onnx"


@pytest.mark.slow
def test_sets_carry_source_files_and_captions(bundle):
    b = open_bundle(bundle)
    ev = b.load_npz("evalset.npz")
    files = unpack_files(ev, "evalset.npz")
    assert files[2][:8] == b"\x89PNG\r\n\x1a\n" and files[0][:2] == b"\xff\xd8"
    assert ev["texts"].tolist() == CAPTIONS
    assert b.manifest["data"]["raw"] == {"images": "source files", "eval_bytes": int(ev[IMAGE_BYTES].size),
                                         "probe_bytes": int(b.load_npz("probe.npz")[IMAGE_BYTES].size)}


@pytest.mark.slow
def test_device_decode_and_tokens_match_the_host(bundle):
    b = open_bundle(bundle)
    ev = b.load_npz("evalset.npz")
    images = raw.decode_images(unpack_files(ev, "evalset.npz"), b.manifest["preprocessing"])
    diff = np.abs(images.astype(int) - ev["images"])
    assert np.array_equal(images[2:], ev["images"][2:])  # PNG: decoded fully, the host's prep exactly
    assert diff[:2].mean() < 3 and diff.max() < 64  # JPEG photos: draft-mode decoding, 640 px → 32 px
    assert np.array_equal(raw.tokenize(raw.bundle_tokenizer(b), ev["texts"]), ev["tokens"])


@pytest.mark.slow
def test_bench_reports_both_paths_and_eval_subsets_slice_files(bundle, tmp_path):
    report = run_bench(BenchOptions(bundle=str(bundle), out=str(tmp_path / "r.json"), iters=2, warmup=1,
                                    batch=[1], threads=1, cold=False))
    for name in ("eval", "probe"):
        s = report["raw_inputs"]["sets"][name]
        assert s["status"] == "measured" and s["token_diffs"]["ids"] == 0
        assert s["delta_mean_R@1"] == pytest.approx(s["mean_R@1_device"] - s["mean_R@1_host"])
        assert s["mean_R@1_host"] == report["recall"][name]["mean_R@1"]
        assert 0.9 < s["image_cosine"]["min_cos"] <= s["image_cosine"]["mean_cos"] <= 1.0 + 1e-6
    assert set(report["raw_inputs"]["sets"]["probe"]["parity"]) == {"image", "text"}
    assert "raw inputs: decoded and tokenized here" in format_table(report)
    sub, _ = eval_subset(open_bundle(bundle).load_npz("evalset.npz"), 3)
    assert len(unpack_files(sub, "subset")) == 3


@pytest.mark.slow
def test_older_bundle_without_raw_sets_still_benches(bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    for name in ("evalset.npz", "probe.npz"):
        with np.load(old / name, allow_pickle=False) as z:
            kept = {k: z[k] for k in z.files if k not in (IMAGE_BYTES, IMAGE_OFFSETS, "texts")}
        np.savez(old / name, **kept)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"] = file_hashes(old)
    del manifest["data"]["raw"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    report = run_bench(BenchOptions(bundle=str(old), out=str(tmp_path / "r.json"), iters=2, warmup=1,
                                    batch=[1], threads=1, cold=False))
    assert {s["status"] for s in report["raw_inputs"]["sets"].values()} == {raw.NOT_IN_BUNDLE}
    assert "eval_raw" not in report["recall"] and "eval" in report["recall"]
    assert "| eval | not in bundle |" in format_table(report)


@pytest.mark.slow
def test_pyz_decodes_and_tokenizes_without_torch(pyz, bundle, tmp_path):
    out = tmp_path / "pyz.json"
    cmd = [sys.executable, "-S", str(pyz), "--bundle", str(bundle), "--iters", "2", "--warmup", "1",
           "--batch", "1", "--threads", "1", "--no-cold", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sets = json.loads(out.read_text())["raw_inputs"]["sets"]
    assert sets["eval"]["status"] == "measured" and sets["eval"]["token_diffs"]["ids"] == 0
