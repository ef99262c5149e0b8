"""Quantization across families: calibration manifests, recipe choice, the shared PT2E and embedding
pieces, the sensitivity scan, QAT via the trainer, the quant report (each family's recipe is tested in
tests/families)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import DATA, tiny_dataset
from torch import nn

from edge_msd.data import open_dataset
from edge_msd.errors import ArtifactError, ConfigError, DataError, QuantError
from edge_msd.families import family
from edge_msd.quant.calibration import (
    build_calibration_set,
    check_calibration_set,
    load_calibration_set,
    save_calibration_set,
)
from edge_msd.quant.recipes import quantizer_for, recipe_for_target
from edge_msd.students.towers import explicit_attention

# ---- calibration sets ----------------------------------------------------------------------------


def test_calibration_set_is_stratified_reproducible_and_round_trips(tmp_path):
    ds = open_dataset(DATA, "train")
    cs = build_calibration_set(ds, 32, seed=3)
    assert cs.n == 32 and cs.strategy == "index-bins" and cs.dataset_fingerprint == ds.fingerprint()
    edges = np.linspace(0, ds.n_images, 33).astype(int)  # one image per bin of the split
    assert all(lo <= i < hi for i, lo, hi in zip(cs.image_ids, edges[:-1], edges[1:], strict=True))
    assert all(ds.caption_image_index[j] == i for i, j in zip(cs.image_ids, cs.caption_ids, strict=True))
    assert build_calibration_set(ds, 32, seed=3) == cs
    assert build_calibration_set(ds, 32, seed=4).sha256 != cs.sha256
    path = save_calibration_set(cs, tmp_path / "c.json")
    assert load_calibration_set(path) == cs
    check_calibration_set(cs, ds)


def test_calibration_set_per_class_with_labels():
    ds = tiny_dataset()
    ds.labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    cs = build_calibration_set(ds, 4, seed=0, min_samples=4)
    assert cs.strategy == "per-class"
    assert sorted(ds.labels[cs.image_ids].tolist()) == [0, 0, 0, 1]  # 6:2 → 3:1


def test_calibration_errors(tmp_path):
    ds = open_dataset(DATA, "train")
    with pytest.raises(ConfigError, match="too small"):
        build_calibration_set(ds, 8)
    with pytest.raises(DataError, match="fewer than"):
        build_calibration_set(ds, 64)
    cs = build_calibration_set(ds, 32)
    with pytest.raises(DataError, match="another dataset"):
        check_calibration_set(cs, open_dataset(DATA.replace("n_train=48", "n_train=40"), "train"))
    with pytest.raises(DataError, match="split"):
        check_calibration_set(cs, open_dataset(DATA, "val"))
    with pytest.raises(ConfigError, match="at least 64"):
        check_calibration_set(cs, ds, min_samples=64)
    path = save_calibration_set(cs, tmp_path / "c.json")
    data = json.loads(path.read_text())
    data["image_ids"][0] = (data["image_ids"][0] + 1) % 48
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_calibration_set(path)
    with pytest.raises(ArtifactError, match="not found"):
        load_calibration_set(tmp_path / "missing.json")


def test_calibrate_cli_writes_manifest(tmp_path):
    from click.testing import CliRunner

    from edge_msd.cli import main

    out = tmp_path / "cal.json"
    res = CliRunner().invoke(
        main, ["calibrate", "--data", DATA, "--n", "32", "--seed", "1", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert load_calibration_set(out).n == 32
    res = CliRunner().invoke(main, ["calibrate", "--data", DATA, "--n", "4", "--out", str(out)])
    assert res.exit_code == 2 and "too small" in res.output
    # the same from a TOML config; the command line wins over the file
    toml = tmp_path / "cal.toml"
    toml.write_text(f'[calibrate]\ndata = "{DATA}"\nn = 40\nseed = 2\nout = "{out}"\n')
    res = CliRunner().invoke(main, ["calibrate", "--config", str(toml), "--n", "36"])
    assert res.exit_code == 0, res.output
    assert load_calibration_set(out).n == 36 and load_calibration_set(out).seed == 2


# ---- recipes -------------------------------------------------------------------------------------


def test_recipe_chosen_by_target_and_missing_recipe_error(tmp_path):
    assert recipe_for_target("tflite").backend == "pt2e"
    assert recipe_for_target("jetson").backend == "modelopt"
    assert recipe_for_target("coreml").backend == "coreml"
    with pytest.raises(ConfigError, match="'onnx'.*no int8 quantization recipe"):
        recipe_for_target("onnx")
    from edge_msd.targets import load_target

    profile = load_target("tflite")
    def with_quant(quant: dict):  # the family's typed [options] with [options.quant] set
        return replace(profile, options=replace(profile.options, quant=quant))

    tuned = with_quant({"keep_float": ["visual.conv1"], "allow_fallback": True})
    assert recipe_for_target(tuned).keep_float == ("visual.conv1",)
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        recipe_for_target(with_quant({"bogus": 1}))


def test_explicit_attention_matches_multihead_attention():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    holder = torch.nn.Module()
    holder.attn = mha
    x = torch.randn(3, 5, 16)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    explicit_attention(holder)
    assert not isinstance(holder.attn, torch.nn.MultiheadAttention)
    torch.testing.assert_close(holder.attn(x, x, x, need_weights=False, attn_mask=mask)[0], ref)


def test_float_mul_finds_scalings_and_integer_masks():
    from edge_msd.families.common.pt2e import float_mul

    class Pool(nn.Module):
        def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            mask = (tokens == 7).to(torch.float32)
            return (x * 0.5) * (x * x) * mask.unsqueeze(-1)

    x, tokens = torch.randn(2, 4, 3), torch.tensor([[7, 1, 2, 3], [1, 7, 2, 3]], dtype=torch.int32)
    gm = torch.export.export(Pool(), (x, tokens)).module()
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.mul.Tensor]
    # by a number: float; x * x (both activations): int8; the product with the token mask: float
    assert [float_mul(n) for n in muls] == [True, False, False, True]


def test_int8_token_embedding_rows_scale_and_lookup():
    from edge_msd.families.common.embedding import Int8Embedding, int8_token_embedding

    torch.manual_seed(0)
    table = nn.Embedding(1000, 16)
    with torch.no_grad():
        table.weight[3] *= 100.0  # one loud row must not cost the other rows their precision
    q = Int8Embedding(table)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (1000, 1)
    assert int(q.weight_int8.abs().amax(dim=1).min()) == 127  # each row uses the full int8 range
    tokens = torch.tensor([[3, 5, 999, 0]], dtype=torch.int32)
    ref = table(tokens.long()).detach()
    got = q(tokens)
    assert torch.all((got - ref).abs() <= q.scale[tokens.long()] / 2 + 1e-7)  # half a step per row
    image = nn.Linear(2, 2)
    assert int8_token_embedding(image) is image  # no table: unchanged


def test_sensitivity_scan_and_first_last(towers, batches):
    from edge_msd.quant.pipeline import quantize_tower

    quantizer = quantizer_for(replace(family("tensorrt").recipe, scan_max_layers=1, scan_min_gain=-1.0))
    prepared, info = quantize_tower(quantizer, towers[1], batches[1], qat=False)
    scan = info["sensitivity_scan"]
    assert [r["gain"] for r in scan] == sorted((r["gain"] for r in scan), reverse=True)
    assert sum(r["kept_float"] for r in scan) == 1
    kept = set(info["kept_float"])
    assert scan[0]["layer"] in kept and len(kept) >= 2  # first/last + the most sensitive
    assert not kept & set(quantizer.layers(prepared))


def _qat_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A train feature cache under tmp_path/f, an edge-xs student and a 32-image calibration set."""
    from distill_helpers import TinyTeacher

    from edge_msd.students import create_student, save_student
    from edge_msd.teachers.cache import build_feature_cache

    build_feature_cache(TinyTeacher(), open_dataset(DATA, "train"), tmp_path / "f" / "train", progress=False)
    torch.manual_seed(0)
    student = save_student(create_student("edge-xs", embed_dim=32), tmp_path / "student", "edge-xs")
    cal = save_calibration_set(build_calibration_set(open_dataset(DATA, "train"), 32), tmp_path / "cal.json")
    return student, cal


@pytest.mark.slow
def test_qat_reuses_trainer_and_writes_artifact(tmp_path):
    from edge_msd.artifacts import read_manifest, verify_files
    from edge_msd.quant.config import QuantConfig
    from edge_msd.quant.pipeline import QuantStudent, _check_finite, quantize_student

    student, cal = _qat_inputs(tmp_path)
    cfg = QuantConfig(
        target="jetson",
        method="qat",
        student=str(student),
        calibration=str(cal),
        data=DATA,
        features=str(tmp_path / "f"),
        steps=3,
        batch_size=8,
        warmup_steps=1,
        calib_batch=16,
        out=str(tmp_path / "qat"),
    )
    out = quantize_student(cfg)
    manifest = read_manifest(out, kind="edge-msd-quantized")
    verify_files(out, manifest)
    assert manifest["method"] == "qat" and manifest["recipe"]["name"] == "tensorrt-int8-qdq"
    assert manifest["calibration"]["sha256"] == load_calibration_set(cal).sha256
    assert manifest["train"]["steps"] == 3 and manifest["train"]["skipped_steps"] == 0
    assert (Path(manifest["train"]["out"]) / "metrics.jsonl").is_file()  # the distillation trainer ran it
    for name in ("image", "text"):
        assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out / f"models/{name}.onnx")).graph.node}
    with pytest.raises(QuantError, match="already exists"):
        quantize_student(cfg)
    _export_ships_the_artifact(out, tmp_path, cal)
    bad = QuantStudent(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        bad.image.weight[0, 0] = float("nan")
    with pytest.raises(QuantError, match="image.weight.*not finite"):
        _check_finite(bad, "QAT")


def _export_ships_the_artifact(art: Path, tmp_path: Path, cal: Path) -> None:
    """`edge-msd export --target jetson --quantized ART`: the QAT models in a verified bundle, parity
    against the float student, recipe and calibration set recorded; then the bench reads the bundle."""
    from click.testing import CliRunner

    from edge_msd.bench.options import BenchOptions
    from edge_msd.bench.run import run_bench
    from edge_msd.cli import main
    from edge_msd.export.bundle import verify_bundle

    bundle = tmp_path / "bundle"
    args = ["export", "--target", "jetson", "--quantized", str(art), "--data", DATA, "--probe-images", "8",
            "--out", str(bundle), "--allow-parity-fail"]  # 3 QAT steps from random weights: parity is noise
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = verify_bundle(bundle).manifest
    art_manifest = json.loads((art / "manifest.json").read_text())
    assert m["student"]["sha256"] == art_manifest["student"]["sha256"]  # the float student, found from ART
    for name in ("image", "text"):
        entry = m["models"][name]
        assert entry["precision"] == "int8" and entry["tensorrt_check"]["qdq_pairs"] > 0
        assert (bundle / m["models"][name]["file"]).read_bytes() == (art / f"models/{name}.onnx").read_bytes()
    assert m["calibration"] == art_manifest["calibration"] and m["calibration"]["sha256"]
    q = m["quantization"]
    assert q["method"] == "qat" and q["recipe"] == art_manifest["recipe"] and q["artifact"] == str(art)
    assert q["train"]["steps"] == 3 and m["config"]["quantized"] == str(art)
    assert m["parity"]["thresholds"] == {"min_cos": 0.95, "max_delta_r1": 5.0} and "passed" in m["parity"]
    assert m["parity"]["image"]["min_cos"] > 0.8 and m["parity"]["text"]["mean_cos"] > 0.9
    # the profile's runtime is TensorRT (engines built on the device): here its ONNX runs in ONNX Runtime
    opts = BenchOptions(bundle=str(bundle), runtime="onnxruntime", iters=2, warmup=0, pool=1,
                        out=str(tmp_path / "r.json"))
    report = run_bench(opts)
    assert report["runtime"]["name"] == "onnxruntime" and report["recall"]["eval"]["mean_R@1"] >= 0
    assert report["parity"]["image"]["min_cos"] == pytest.approx(m["parity"]["image"]["min_cos"], abs=1e-4)
    # refused: another target, another student, a contradicting precision, a tampered artifact
    res = CliRunner().invoke(main, [*args[:2], "tflite", *args[3:], "--force"])
    assert res.exit_code == 2 and "quantized for target 'jetson-orin'" in res.output
    other = tmp_path / "other"
    from export_helpers import make_tiny_student

    make_tiny_student(other)
    res = CliRunner().invoke(main, [*args, "--force", "--student", str(other)])
    assert res.exit_code == 2 and "quantized from another student" in res.output
    res = CliRunner().invoke(main, [*args, "--force", "--precision", "fp16"])
    assert res.exit_code == 2 and "contradicts" in res.output
    with open(art / "models" / "text.onnx", "ab") as f:
        f.write(b"\0")
    res = CliRunner().invoke(main, [*args, "--force"])
    assert res.exit_code == 2 and "text.onnx" in res.output
    assert verify_bundle(bundle).manifest["files"] == m["files"]  # the failed exports left the bundle alone


@pytest.mark.slow
def test_tflite_qat_through_trainer_then_report(tmp_path):
    """PT2E QAT (exported graph, observer/BN freezing on schedule) → .tflite artifact → report rows."""
    from edge_msd.quant.config import QuantConfig
    from edge_msd.quant.pipeline import quantize_student
    from edge_msd.quant.report import quant_report

    student, cal = _qat_inputs(tmp_path)
    common = dict(target="tflite", student=str(student), calibration=str(cal), data=DATA, calib_batch=16)
    quantize_student(QuantConfig(method="ptq", out=str(tmp_path / "qat" / "tflite-ptq"), **common))
    out = quantize_student(
        QuantConfig(
            method="qat",
            features=str(tmp_path / "f"),
            steps=4,
            batch_size=8,
            warmup_steps=1,
            out=str(tmp_path / "qat" / "tflite"),
            **common,
        )
    )
    assert (out / "models" / "image.tflite").is_file()
    report = quant_report(
        ["tflite"],
        student=str(student),
        calibration=str(cal),
        data=DATA,
        out=tmp_path / "qat",
        n_images=16,
        split="test",
    )
    variants = {r["variant"]: r for r in report["rows"]}
    assert set(variants) == {"fp32", "ptq", "qat"} and variants["qat"]["measured_with"] == "litert"
    assert report["tflite_latency"]["tflite"]["towers"]["image"]["int8_ms"] > 0
    assert (tmp_path / "qat" / "quant_report.md").is_file()


class _Payload:
    """A pickle that makes a folder when unpickled: what a planted artifact would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.slow
def test_coreml_report_reads_safetensors_state_and_refuses_planted_pickles(tmp_path):
    """The Core ML rows rebuild fake-quant towers from the artifact's state: it is safetensors, hashed in
    the manifest, and a pickle put in its place (listed or not) is refused without being unpickled."""
    import pickle

    from export_helpers import make_tiny_student

    from edge_msd.artifacts import sha256_file
    from edge_msd.quant.config import QuantConfig
    from edge_msd.quant.pipeline import STATE_FILE, quantize_student
    from edge_msd.quant.report import quant_report

    student = make_tiny_student(tmp_path / "student")
    cal = save_calibration_set(build_calibration_set(open_dataset(DATA, "train"), 32), tmp_path / "cal.json")
    common = dict(student=str(student), calibration=str(cal), data=DATA)
    out = str(tmp_path / "qat" / "coreml-ptq")
    art = quantize_student(QuantConfig(target="coreml", method="ptq", calib_batch=16, out=out, **common))

    def report() -> dict:
        return quant_report(["coreml"], out=tmp_path / "qat", n_images=8, **common)

    rows = {r["variant"]: r for r in report()["rows"]}
    assert rows["ptq"]["measured_with"] == "fake-quant torch" and 0 <= rows["ptq"]["mean_R@1"] <= 100
    assert not list(art.rglob("*.pt"))

    manifest_path = art / "manifest.json"
    original = manifest_path.read_text()
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))

    def plant(name: str, listed: bool) -> None:
        (art / name).write_bytes(payload)
        m = json.loads(original)
        if listed:
            del m["files"][STATE_FILE]
            m["files"][name] = sha256_file(art / name)
        manifest_path.write_text(json.dumps(m))

    plant(STATE_FILE, listed=False)  # hash no longer matches
    with pytest.raises(ArtifactError, match=f"{STATE_FILE}: sha256 .* differs from manifest"):
        report()
    plant(STATE_FILE, listed=True)  # hash updated to match: still not safetensors
    with pytest.raises(ArtifactError, match=f"{STATE_FILE}: not a safetensors file"):
        report()
    (art / STATE_FILE).unlink()
    plant("quantized_state.pt", listed=True)  # the old pickle layout
    with pytest.raises(ArtifactError, match=f"no {STATE_FILE} in its manifest"):
        report()
    assert not marker.exists()
    pickle.loads(payload)  # the payload was live: unpickling it would have run
    assert marker.is_dir()
