"""End-to-end query latency (edge_msd/bench/query.py): per-stage timings in the bench report, the skip
reasons of older bundles, ``--gallery`` rows, the printed and merged tables and the stacked-bar plot."""

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import CTX, DIM, _opts, _tower_graph, make_bundle
from PIL import Image

from edge_msd.artifacts import file_hashes
from edge_msd.bench import query
from edge_msd.bench.report import format_table, gallery_rows, merge_reports, query_rows
from edge_msd.bench.run import run_bench
from edge_msd.bench.tokenizer import Tokenizer
from edge_msd.contract.raw import pack_files
from edge_msd.errors import ConfigError

CLIP_VOCAB = 49408  # ids the bundle's real tokenizer gives: the text tower's table must cover them


def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def raw_bundle(tmp_path_factory) -> Path:
    """make_bundle's tiny bundle with what newer exports add: the eval set's image files and captions, and
    the CLIP tokenizer (the text tower widened to its vocabulary)."""
    from open_clip.tokenizer import default_bpe

    root = make_bundle(tmp_path_factory.mktemp("query") / "onnx")
    weight = np.random.default_rng(1).normal(size=(CLIP_VOCAB, DIM))
    _tower_graph("text", weight, root / "models" / "text.onnx")
    (root / "tokenizer").mkdir()
    vocab = shutil.copy(default_bpe(), root / "tokenizer")
    (root / "tokenizer" / "tokenizer.json").write_text(json.dumps(
        {"vocab": Path(vocab).name, "context_length": CTX, "sot_token": 49406, "eot_token": 49407}))
    with np.load(root / "evalset.npz", allow_pickle=False) as z:
        ev = {k: z[k] for k in z.files}
    captions = [f"a photo of a red car number {i}" for i in range(len(ev["tokens"]))]
    ev |= {"texts": np.array(captions), **pack_files([_png(f) for f in ev["images"]])}
    np.savez(root / "evalset.npz", **ev)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = file_hashes(root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def report(raw_bundle, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("query_report") / "r.json"
    return run_bench(_opts(raw_bundle, out, cold=False, vendor=False, gallery=[300, 50]))


def test_stage_timings_exist_and_total_covers_the_model(report):
    q = report["query"]
    assert q["storage"] == "int8" and q["gallery_n"] == 12
    for direction, stages in (("image", query.IMAGE_STAGES), ("text", (*query.TEXT_STAGES, "tokenize_cold"))):
        d = q[direction]
        assert set(d["stages"]) == {*stages, "total"}
        for st in d["stages"].values():
            assert st["n"] == query.QUERIES and 0 < st["p50"] <= st["p90"]
        total = d["stages"]["total"]["p50"]
        assert total >= d["stages"]["model"]["p50"]
        assert d["model_share"] == pytest.approx(d["stages"]["model"]["p50"] / total)
        assert d["total_over_model"] == pytest.approx(total / d["model_alone_ms"])
    assert q["image"]["frame_to_embedding"]["p50"] >= q["image"]["stages"]["model"]["p50"]
    assert q["text"]["caption_to_embedding"]["p50"] >= q["text"]["stages"]["model"]["p50"]


def test_gallery_rows_eval_then_random_sizes(report):
    rows = report["query"]["gallery"]
    assert [(g["source"], g["n"], g["storage"]) for g in rows] == [
        ("eval", 12, "int8"), ("random", 300, "int8"), ("random", 50, "int8")]
    assert all(g["search_ms"]["n"] == query.QUERIES and g["search_ms"]["p50"] > 0 for g in rows)
    assert [r[:3] for r in gallery_rows(report)] == [["eval", "12", "int8"], ["random", "300", "int8"],
                                                     ["random", "50", "int8"]]


def test_printed_table_and_goal_notes(report):
    text = format_table(report, style="aligned")
    assert "end-to-end query, one at a time (ms)" in text and "query search per gallery" in text
    assert "tokenize (cold: cache emptied per query)" in text
    assert "image query: uint8 frame → embedding p50 =" in text and "goal ≤ 1.5×" in text
    rows = query_rows(report)
    assert [r[:2] for r in rows if r[0] == "image"][-1] == ["image", "total"]
    assert rows[0][4].endswith("%")


def test_merged_report_table_and_stacked_plot(report, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report, sort_keys=True))  # as reports are written: stages keep their order
    out = merge_reports([path, path], tmp_path / "merged")
    md = out["markdown"].read_text()
    section = md.split("## End-to-end query (ms)")[1].split("##")[0]
    image_stages = [line.split(" | ")[2] for line in section.splitlines() if " | image | " in line][:5]
    assert image_stages == ["decode", "normalise (input contract)", "model (batch 1)", "search", "total"]
    assert "## End-to-end query (ms)" in md and "![query_stages](query_stages.png)" in md
    assert "End-to-end query (ms)" in out["html"].read_text()
    assert out["query_stages"].stat().st_size > 1000


def test_older_bundle_without_raw_sets_is_skipped_with_its_reason(bundle, tmp_path):
    report = run_bench(_opts(bundle, tmp_path / "r.json", cold=False, vendor=False))
    assert report["query"] == {"skipped": "eval set has no raw inputs: not in bundle (older bundle)"}
    assert "not measured: eval set has no raw inputs" in format_table(report)
    assert query_rows(report)[0][1].startswith("not measured")


def test_missing_pillow_and_no_recall_skip_with_reasons(raw_bundle, tmp_path, monkeypatch):
    report = run_bench(_opts(raw_bundle, tmp_path / "a.json", cold=False, vendor=False, recall=False))
    assert report["query"]["skipped"].startswith("--no-recall")
    missing = "Pillow is not installed (pip install Pillow)"
    monkeypatch.setattr("edge_msd.bench.raw.pillow_missing", lambda: missing)
    report = run_bench(_opts(raw_bundle, tmp_path / "b.json", cold=False, vendor=False))
    assert report["query"]["skipped"] == f"eval set has no raw inputs: {missing}"


def test_without_batch_1_each_direction_says_why(raw_bundle, tmp_path):
    report = run_bench(_opts(raw_bundle, tmp_path / "r.json", cold=False, vendor=False, batch=[4]))
    assert report["query"]["image"]["skipped"].startswith("no batch-1 image session")
    assert report["query"]["text"]["skipped"].startswith("no batch-1 text session")
    assert [g["source"] for g in report["query"]["gallery"]] == ["eval"]


def test_bad_gallery_options_named(raw_bundle, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("--gallery-storage 'int4': expected fp32 | fp16 | int8")):
        run_bench(_opts(raw_bundle, tmp_path / "r.json", gallery_storage="int4"))
    with pytest.raises(ConfigError, match="--gallery: sizes must be ≥ 1"):
        _opts(raw_bundle, tmp_path / "r.json", gallery=[0]).validate()


def test_forget_empties_the_word_cache_only(raw_bundle):
    tok = Tokenizer.from_dir(raw_bundle / "tokenizer")
    ids = tok(["a red car"])
    assert len(tok.cache) > 2
    tok.forget()
    assert len(tok.cache) == 2 and tok(["a red car"]) == ids
