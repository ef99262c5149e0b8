"""edge_msd.bench.run: a whole run on a tiny ONNX bundle with known answers (recall, parity), its
limits, partial reports, refused bundles and options, and the profile's defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_helpers import PRE, _opts, _reference, _weights, make_bundle

from edge_msd.bench import runtimes, sysinfo
from edge_msd.bench.options import BenchOptions
from edge_msd.bench.report import SCHEMA, format_table, merge_reports
from edge_msd.bench.run import embed, profile_defaults, run_bench
from edge_msd.bench.timing import Deadline
from edge_msd.contract.reading import open_bundle, preprocess_images
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.eval.retrieval import retrieval_metrics


def test_bench_run_measures_recall_and_parity(bundle, tmp_path, capsys):
    out = tmp_path / "r.json"
    report = run_bench(_opts(bundle, out))
    assert not report["partial"] and json.loads(out.read_text())["schema"] == SCHEMA
    assert report["runtime"]["name"] == "onnxruntime" and report["settings"]["batches"] == [1, 4]
    for tower in ("image", "text"):
        ms = report["towers"][tower]["measurements"]
        assert [m["batch"] for m in ms] == [1, 4]
        for m in ms:
            lat = m["latency_ms"]
            assert m["iters"] == 5 == lat["n"] == len(m["samples_ms"]) and m["warmup_iters"] == 1
            assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert m["load_ms"] > 0 and m["first_inference_ms"] > 0 and m["peak_rss_mb"] > 0
            assert m["session"]["intra_op_threads"] == 1 and m["pool_batches"] >= 1
        assert report["parity"][tower]["min_cos"] > 0.99999
    # recall from the embeddings made here equals recall from the reference embeddings
    probe = np.load(bundle / "probe.npz")
    ref = retrieval_metrics(probe["image_emb"], probe["text_emb"], probe["caption_image_index"])
    assert report["recall"]["probe"] == ref and report["recall"]["probe_delta_mean_R@1"] == 0
    assert report["recall"]["eval"]["n_images"] == 12 and report["recall"]["eval"]["n_texts"] == 24
    env = report["environment"]
    assert env["cpu"] and env["cpu_count"] >= 1 and env["runtimes"]["onnxruntime"]
    table = format_table(report)
    assert "p50 ms" in table and "parity image" in table and "recall eval" in table
    for tower, first_op in (("image", "MatMul"), ("text", "Gather")):
        t = report["towers"][tower]
        p = t["placement"]  # ONNX Runtime's profiling: every node on the CPU EP, per-node times
        assert (
            p["available"] and p["accelerator"] == "CPUExecutionProvider" and p["on_accelerator"] == p["ops"]
        )
        assert (
            first_op in {o["op"] for o in p["slowest"]}
            and abs(sum(o["share"] for o in p["slowest"]) - 1) < 0.01
        )
        cold = t["cold"]  # a fresh process that never imported torch
        assert cold["available"] and cold["torch_imported"] is False, cold
        assert cold["load_ms"] > 0 and cold["first_inference_ms"] > 0 and cold["footprint_mb"] > 0
        assert cold["peak_inference_mb"] >= cold["footprint_mb"] - 1
    assert report["settings"]["threads_choice"]["source"] == "--threads"
    assert "op placement" in table and "cold start" in table and "CPUExecutionProvider" in table


def test_eval_limit_benches_the_first_images_and_their_captions(bundle, tmp_path):
    """Recall on the first 5 images of 12 with their captions equals recall of those rows alone; the report
    records the limit and the tables call that recall a subset."""
    report = run_bench(_opts(bundle, tmp_path / "r.json", batch=[1], eval_limit=5, cold=False, vendor=False))
    ev = np.load(bundle / "evalset.npz")
    keep = np.flatnonzero(ev["caption_image_index"] < 5)
    w_img, w_txt = _weights(np.random.default_rng(0))
    img = _reference("image", w_img, preprocess_images(ev["images"][:5], PRE))
    txt = _reference("text", w_txt, ev["tokens"][keep])
    rec = report["recall"]["eval"]
    want = retrieval_metrics(img, txt, ev["caption_image_index"][keep])
    assert {k: rec[k] for k in want} == want
    assert rec["subset"] == {"n_images": 5, "of_images": 12, "n_texts": 10, "of_texts": 24}
    assert report["settings"]["eval_limit"] == 5 and "subset" not in report["recall"]["probe"]
    assert "recall eval subset (first 5 of 12 images) (5 images, 10 texts)" in format_table(report)
    merged = merge_reports([tmp_path / "r.json"], tmp_path / "merged")
    assert "| eval subset (first 5 of 12 images) |" in merged["markdown"].read_text()


def test_eval_limit_at_or_above_the_set_is_the_whole_set_and_below_one_is_refused(bundle, tmp_path):
    report = run_bench(_opts(bundle, tmp_path / "r.json", batch=[1], eval_limit=50, cold=False, vendor=False))
    assert report["recall"]["eval"]["n_images"] == 12 and "subset" not in report["recall"]["eval"]
    with pytest.raises(ConfigError, match="--eval-limit must be ≥ 1 image, got 0"):
        run_bench(_opts(bundle, tmp_path / "r0.json", eval_limit=0))


def test_profile_defaults_from_target():
    d = profile_defaults({"batch_sizes": [8, 1], "bench": {"warmup": 20, "iterations": 200, "threads": 0}})
    assert d == {"batch": [1, 8], "warmup": 20, "iters": 200}  # threads 0 = runtime default
    assert profile_defaults({}) == {}


def test_embed_pads_the_last_batch(bundle):
    b = open_bundle(bundle)
    s = runtimes.OnnxRuntimeBackend().load(b.model("text"), b.model_path("text"), 1, 5, {})
    tokens = b.load_npz("probe.npz")["tokens"]
    e5 = embed(s, tokens, 5, Deadline())  # 24 rows = 4 × 5 + 4 padded
    np.testing.assert_allclose(e5, b.load_npz("probe.npz")["text_emb"], atol=1e-5)


def test_time_limit_writes_partial_report(bundle, tmp_path):
    out = tmp_path / "p.json"
    report = run_bench(_opts(bundle, out, iters=None, duration=30.0, time_limit=1.0))
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and saved["interrupted"] == "time limit" == report["interrupted"]
    m = saved["towers"]["image"]["measurements"][0]
    assert m["iters"] > 0 and m["complete"] is False and m["latency_ms"]["p50"] > 0
    assert "PARTIAL REPORT (time limit)" in format_table(saved)


def test_ctrl_c_writes_partial_report(bundle, tmp_path, monkeypatch):
    out = tmp_path / "c.json"
    real = runtimes.OrtSession.run
    calls = {"n": 0}

    def run(self, feed):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(self, feed)

    monkeypatch.setattr(runtimes.OrtSession, "run", run)
    report = run_bench(_opts(bundle, out, iters=100, batch=[1]))
    saved = json.loads(out.read_text())
    assert saved["partial"] and saved["interrupted"] == "Ctrl-C" == report["interrupted"]
    assert saved["towers"]["image"]["measurements"][0]["iters"] == 17  # first + 1 warm-up + 17 timed
    assert saved["towers"]["text"]["measurements"] == [] and saved["recall"] is None


def test_tampered_bundle_is_refused_naming_the_file(tmp_path):
    b = make_bundle(tmp_path / "b")
    data = bytearray((b / "models" / "text.onnx").read_bytes())
    data[-1] ^= 0xFF
    (b / "models" / "text.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"models/text\.onnx: sha256 .* differs from manifest"):
        run_bench(_opts(b, tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_missing_tower_and_bad_options(bundle, tmp_path):
    with pytest.raises(ConfigError, match="unknown tower"):
        run_bench(_opts(bundle, tmp_path / "r.json", towers=["audio"]))
    with pytest.raises(ConfigError, match="batch sizes must be"):
        run_bench(_opts(bundle, tmp_path / "r.json", batch=[0]))


def test_profile_threads_are_capped_in_a_run(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sysinfo, "usable_cores", lambda: 1)
    target = {"name": "onnx", "batch_sizes": [1], "bench": {"threads": 4, "warmup": 1, "iterations": 3}}
    b = make_bundle(tmp_path / "b", target=target)
    report = run_bench(BenchOptions(bundle=str(b), out=str(tmp_path / "r.json"), cold=False), echo=print)
    assert report["settings"]["threads"] == 1
    assert report["towers"]["image"]["measurements"][0]["session"]["intra_op_threads"] == 1
    report = run_bench(BenchOptions(bundle=str(b), out=str(tmp_path / "r.json"), cold=False, threads=3))
    assert "exceeds the 1 usable CPU cores" in capsys.readouterr().out
    assert "exceeds the 1 usable CPU cores" in format_table(report)


def test_profile_bench_runtime_is_applied_unless_an_option_is_given(tmp_path):
    bench = {"warmup": 0, "iterations": 2, "runtime": "onnxruntime"}
    target = {"name": "onnx", "batch_sizes": [1], "bench": bench}
    b = make_bundle(tmp_path / "ort", target=target)
    report = run_bench(BenchOptions(bundle=str(b), out=str(tmp_path / "r.json"), cold=False, vendor=False))
    assert report["runtime"]["name"] == "onnxruntime" and report["settings"]["warmup"] == 0
    # a profile naming a runtime that cannot run these files: the profile's choice is what is refused
    target = {**target, "bench": {**bench, "runtime": "litert"}}
    b = make_bundle(tmp_path / "lite", target=target)
    opts = {"bundle": str(b), "out": str(tmp_path / "r.json"), "cold": False, "vendor": False}
    with pytest.raises(ConfigError, match="runtime litert runs tflite models, but this bundle has image: on"):
        run_bench(BenchOptions(**opts))
    with pytest.raises(ConfigError, match=r"litert is the target profile's \[bench\] runtime; --runtime"):
        run_bench(BenchOptions(**opts))
    assert run_bench(BenchOptions(**opts, runtime="auto"))["runtime"]["name"] == "onnxruntime"


def test_manifest_bench_table_is_typed(tmp_path):
    with pytest.raises(ArtifactError, match="target.bench has unknown field.*iter; known: duration"):
        profile_defaults({"bench": {"iter": 5}})
    with pytest.raises(ArtifactError, match="target.bench: field 'runtime' is 'tpu'; expected one of tens"):
        profile_defaults({"bench": {"runtime": "tpu"}})
