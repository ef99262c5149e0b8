"""The gallery index: storages, exact search, recall of the compressed storages, refusals, the artifact."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_msd.bench import index
from edge_msd.bench.gallery import IndexOptions, build_index, open_index
from edge_msd.contract.reading import open_bundle
from edge_msd.errors import ArtifactError, ConfigError


def _clustered(n: int = 2000, dim: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    v = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("storage", index.STORAGES)
def test_storage_round_trip_keeps_vectors(storage, tmp_path):
    v = _clustered(200, 64)
    np.savez(tmp_path / "s.npz", **index.encode(v, storage))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        back = index.decode({k: z[k] for k in z.files}, storage)
    cos = np.sum(back * v, axis=1) / np.linalg.norm(back, axis=1)
    assert back.shape == v.shape and cos.min() > {"fp32": 0.9999, "fp16": 0.999, "int8": 0.999,
                                                   "binary": 0.6}[storage]


def test_fp32_search_equals_brute_force():
    v, q = _clustered(1500), _clustered(20, seed=1)
    scores, ids = index.search(index.encode(v, "fp32"), "fp32", q, k=10)
    full = q @ v.T
    assert np.array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :10])
    assert np.allclose(scores, np.take_along_axis(full, ids, axis=1))


def test_chunked_search_merges_like_one_pass(monkeypatch):
    v, q = _clustered(1000), _clustered(7, seed=2)
    whole = index.search(index.encode(v, "int8"), "int8", q, k=10)
    monkeypatch.setattr(index, "QUERY_CHUNK", 7 * 64)  # 64 rows per chunk
    assert np.array_equal(index.search(index.encode(v, "int8"), "int8", q, k=10)[1], whole[1])


def test_int8_scores_are_the_int32_dot_times_scales():
    v, q = _clustered(300), _clustered(3, seed=3)
    arrays = index.encode(v, "int8")
    scores, ids = index.search(arrays, "int8", q, k=5)
    qc, qs = index.quantize_int8(q)
    dot = qc.astype(np.int64) @ arrays["codes"].astype(np.int64).T
    ref = dot * qs[:, None] * arrays["scales"][None, :]
    assert np.allclose(scores, np.take_along_axis(ref, ids, axis=1), rtol=1e-6)


def test_int8_recall_and_size_against_fp32():
    v, q = _clustered(), _clustered(100, seed=4)
    _, exact = index.search(index.encode(v, "fp32"), "fp32", q, k=10)
    _, ids = index.search(index.encode(v, "int8"), "int8", q, k=10)
    assert index.recall_at(ids, exact, 10) >= 0.99 and index.overlap_at(ids, exact, 10) >= 0.95
    ratio = index.storage_bytes(index.encode(v, "fp32")) / index.storage_bytes(index.encode(v, "int8"))
    assert ratio > 3.5


def test_binary_hamming_matches_unpacked_bits_and_rerank_helps():
    v, q = _clustered(), _clustered(50, seed=5)
    arrays = index.encode(v, "binary")
    scores, ids = index.search(arrays, "binary", q, k=10)
    signs = np.where(v > 0, 1, -1)
    ref = (np.where(q > 0, 1, -1) @ signs.T) / v.shape[1]
    assert np.allclose(scores, np.take_along_axis(ref, ids, axis=1))
    _, exact = index.search(index.encode(v, "fp32"), "fp32", q, k=10)
    _, reranked = index.search(arrays, "binary", q, k=10, rerank=200, exact=v)
    assert index.overlap_at(reranked, exact, 10) > index.overlap_at(ids, exact, 10)


def test_query_contract_is_one_line():
    arrays = index.encode(_clustered(50), "fp32")
    for bad in (np.zeros((2, 64)), np.zeros((2, 32), np.float32), [0.0] * 64):
        with pytest.raises(ConfigError, match=r"float32 numpy array of shape \(Q, 64\) or \(64,\), got"):
            index.search(arrays, "fp32", bad)


def test_search_timings_rows():
    rows = index.search_timings(32, sizes=(500,), storages=("fp32", "binary"), queries=2)
    assert [(r["n"], r["storage"]) for r in rows] == [(500, "fp32"), (500, "binary")]
    assert all(r["ms_per_query"] > 0 and r["bytes"] > 0 for r in rows)


# ---- the artifact, built on the tiny ONNX bundle of the bench tests --------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from bench_helpers import make_bundle

    root = tmp_path_factory.mktemp("index")
    bundle = make_bundle(root / "onnx")
    out = root / "idx"
    manifest = build_index(IndexOptions(bundle=str(bundle), rerank=8, batch=4), out)
    return bundle, out, manifest


def test_index_manifest_records_identity_storages_and_recall(built):
    bundle, out, m = built
    assert m["kind"] == "edge-msd-index" and m["n"] == 12 and m["runtime"] == "onnxruntime"
    assert m["identity"]["student"] == "tiny" and m["identity"]["dim"] == 16
    assert m["identity"]["bundle_digest"] == open_bundle(bundle).digest
    assert set(m["storages"]) == set(index.STORAGES) and m["storages"]["fp32"]["recall"]["R@10"] == 1.0
    assert set(m["files"]) == {f"{s}.npz" for s in index.STORAGES}
    found = open_index(out, open_bundle(bundle))
    scores, ids = found.search(found.arrays("fp32")["vectors"][:3], "fp32", k=1)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_index_refuses_tampering_other_student_and_outside_paths(built, tmp_path):
    import shutil

    bundle, out, _ = built
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["identity"]["student"] = "other"
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match=r"student 'other' \(dim 16\).*student 'tiny' \(dim 16\)"):
        open_index(copy, open_bundle(bundle))
    man["storages"]["fp32"]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="points outside the index"):
        open_index(copy)
    (copy / "int8.npz").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="sha256"):
        open_index(copy)


def test_folder_gallery_skips_or_names_unreadable_images(built, tmp_path):
    from PIL import Image

    bundle, _, _ = built
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + 5 * i, 12), (40 * i, 90, 200)).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    m = build_index(IndexOptions(bundle=str(bundle), images=str(folder), storage=["fp32", "int8"]),
                    tmp_path / "idx")
    assert m["n"] == 3 and m["source"]["skipped"] == 1 and m["source"]["skipped_files"] == ["broken.jpg"]
    assert (tmp_path / "idx" / "items.txt").read_text().split() == ["p0.png", "p1.png", "p2.png"]
    with pytest.raises(Exception, match=r"broken\.jpg: cannot decode image"):
        build_index(IndexOptions(bundle=str(bundle), images=str(folder), strict=True), tmp_path / "idx2")


@pytest.mark.slow
def test_cli_index_on_a_bundle(built, tmp_path):
    bundle, _, _ = built
    out = tmp_path / "cli-idx"
    res = subprocess.run([sys.executable, "-m", "edge_msd.cli", "index", "--bundle", str(bundle), "--out",
                          str(out), "--gallery", "1000", "--storage", "fp32,int8,binary,hnsw"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "int8" in res.stdout and "N=1000" in res.stdout and "hnsw" in res.stdout
    assert json.loads((out / "manifest.json").read_text())["storages"]["hnsw"]["recall"]["R@1"] == 1.0
    assert json.loads((out / "manifest.json").read_text())["search_timings"][0]["n"] == 1000
    res = subprocess.run([sys.executable, "-m", "edge_msd.cli", "index", "--bundle", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "bundle folder not found" in res.stderr


def test_hnsw_storage_round_trips_through_npz_and_finds_the_neighbours(tmp_path):
    pytest.importorskip("faiss")
    v, q = _clustered(3000), _clustered(50, seed=4)
    np.savez(tmp_path / "hnsw.npz", **index.encode(v, "hnsw"))
    with np.load(tmp_path / "hnsw.npz", allow_pickle=False) as z:  # faiss's own bytes, no pickle
        arrays = {k: z[k] for k in z.files}
    _, exact = index.search(index.encode(v, "fp32"), "fp32", q, k=10)
    scores, ids = index.search(arrays, "hnsw", q, k=10)
    assert ids.shape == (50, 10) and np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert np.allclose(scores, np.sum(q[:, None, :] * v[ids], axis=2), atol=1e-5)  # inner products
    assert index.recall_at(ids, exact, 10) >= 0.98
    assert index.storage_bytes(arrays) > v.nbytes  # the graph keeps the vectors too


def test_hnsw_without_faiss_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "faiss"
                        else real(name, *a, **k))
    with pytest.raises(ConfigError, match=r"storage hnsw needs faiss-cpu \(pip install 'edge-msd\[index\]'"):
        index.encode(_clustered(50), "hnsw")
