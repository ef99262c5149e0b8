"""Quantization: calibration manifests, per-target recipes on a tiny open_clip model, QAT via the trainer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_helpers import TINY_CFG, tiny_dataset
from torch import nn

from edge_msd.data import open_dataset
from edge_msd.errors import ArtifactError, ConfigError, DataError, QuantError
from edge_msd.families import family
from edge_msd.families.common.quantizer import cosine_to
from edge_msd.families.tflite import run_tflite
from edge_msd.quant.calibration import (
    build_calibration_set,
    check_calibration_set,
    load_calibration_set,
    save_calibration_set,
)
from edge_msd.quant.recipes import quantizer_for, recipe_for_target
from edge_msd.students.towers import ImageTower, TextTower, explicit_attention

DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"


@pytest.fixture(scope="module")
def towers() -> tuple[ImageTower, TextTower]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CFG).eval()
    return ImageTower(model).eval(), TextTower(model).eval()


@pytest.fixture(scope="module")
def batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    tokens = []
    for _ in range(2):
        t = torch.randint(1, 49000, (8, 16), generator=g, dtype=torch.int32)
        t[:, 0], t[:, 9], t[:, 10:] = 49406, 49407, 0
        tokens.append(t)
    return images, tokens


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


@pytest.mark.slow
def test_tflite_pt2e_int8_runs_in_litert_close_to_float(towers, batches, tmp_path):
    quantizer = quantizer_for(family("tflite").recipe)
    for tower, data, name in ((towers[0], batches[0], "image"), (towers[1], batches[1], "text")):
        prepared = quantizer.quantize(tower, data)
        assert quantizer.layers(prepared)
        path = tmp_path / f"{name}.tflite"
        entry = quantizer.write(prepared, data[0][:1], path)
        assert entry["quantization"] == "full-integer"
        if name == "image":  # full integer: the image enters as int8 with its scale / zero point
            assert entry["inputs"][0]["dtype"] == "int8" and entry["inputs"][0]["quantization"]["scale"] > 0
        out = run_tflite(path, data[1].numpy())
        ref = tower(data[1]).detach()
        assert cosine_to(ref, torch.from_numpy(out)) > 0.98
        sim = quantizer.simulate(prepared)(data[1]).detach()  # the converted torch graph predicts LiteRT
        assert cosine_to(sim, torch.from_numpy(out)) > 0.995


@pytest.mark.slow
def test_tflite_qat_folds_batchnorm_into_int8_convs(batches, tmp_path):
    """A conv+BN tower (the mobile-CNN students): QAT trains conv weights with BN folded in, and the
    LiteRT model holds int8 convs with no float BatchNorm arithmetic left between them."""
    from ai_edge_litert.interpreter import Interpreter

    torch.manual_seed(0)
    tower = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8))
    for m in tower.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    tower.eval()
    quantizer = quantizer_for(family("tflite").recipe)
    prepared = quantizer.quantize(tower, batches[0], qat=True)
    assert not any("batch_norm" in str(n.target) for n in prepared.graph.nodes)
    ref = tower(batches[0][1]).detach()
    assert cosine_to(ref, prepared(batches[0][1]).detach()) > 0.99  # fake-quant with folded BN ≈ float
    path = tmp_path / "cnn.tflite"
    quantizer.write(prepared, batches[0][0][:1], path)
    ops = [d["op_name"] for d in Interpreter(model_path=str(path))._get_ops_details()]
    assert ops.count("CONV_2D") == 2 and "MUL" not in ops and "SUB" not in ops, ops
    assert cosine_to(ref, torch.from_numpy(run_tflite(path, batches[0][1].numpy()))) > 0.98


class _ResidualCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block, pooling, projection and the L2 norm: the ops of edge-s."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block(x) + x
        return nn.functional.normalize(self.proj(x.mean(dim=(2, 3))), dim=-1)


def _float_ops(path: Path) -> list[str]:
    """Op names of a .tflite whose first input tensor is float32, sorted."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    return sorted(o["op_name"] for o in ops if o["inputs"].size and dtypes[o["inputs"][0]] == np.float32)


@pytest.mark.slow
def test_tflite_residual_adds_run_in_int8(batches, tmp_path):
    """The residual add is int8 in the LiteRT model: the only float ops left are the one DEQUANTIZE
    after the int8 projection and the L2 norm (XNNPACK has no int8 reduction or divide for it)."""
    torch.manual_seed(0)
    tower = _ResidualCNN().eval()
    quantizer = quantizer_for(family("tflite").recipe)
    path = tmp_path / "res.tflite"
    quantizer.write(quantizer.quantize(tower, batches[0]), batches[0][0][:1], path)
    assert _float_ops(path) == ["DIV", "MAXIMUM", "MUL", "POW", "SUM"]
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    details = interp._get_ops_details()
    ops = [d["op_name"] for d in details]
    assert ops.count("ADD") == 1 and ops.count("DEQUANTIZE") == 1 and "QUANTIZE" not in ops, ops
    # the int8 image enters NHWC: the first conv reads it without a TRANSPOSE of the input
    image = interp.get_input_details()[0]
    assert list(image["shape"]) == [1, 32, 32, 3]
    assert not [d for d in details if d["op_name"] == "TRANSPOSE" and image["index"] in d["inputs"]]
    out = torch.from_numpy(run_tflite(path, batches[0][1].numpy()))
    assert cosine_to(tower(batches[0][1]).detach(), out) > 0.98


def _ops_by_input_dtype(path: Path) -> dict[str, dict[str, int]]:
    """{"float32"/"int8"/…: {op name: count}} by the dtype of each op's first input."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    dtypes = {d["index"]: np.dtype(d["dtype"]).name for d in interp.get_tensor_details()}
    out: dict[str, Counter] = {}
    for o in interp._get_ops_details():
        if o["inputs"].size:
            out.setdefault(dtypes[o["inputs"][0]], Counter())[o["op_name"]] += 1
    return {k: dict(v) for k, v in out.items()}


@pytest.mark.slow
def test_tflite_text_tower_muls_stay_float_beside_float_ops(towers, batches, tmp_path):
    """The text tower's muls stay float: the attention's query scale (the attention matmuls and softmax
    are float) and the pooling's one-hot weights of the token ids (the projection and L2 norm are float).
    In int8 each was a MUL wrapped in its own QUANTIZE/DEQUANTIZE ops; the int8 ops are the linears, the
    residual and positional adds and the GELU, and the outputs match the simulated int8 graph."""
    quantizer = quantizer_for(family("tflite").recipe)
    prepared = quantizer.quantize(towers[1], batches[1])
    path = tmp_path / "text.tflite"
    quantizer.write(prepared, batches[1][0][:1], path)
    ops = _ops_by_input_dtype(path)
    # int8: 4 linears, 3 adds (2 residual, token + position); GELU (XNNPACK leaves it to the interpreter);
    # the DEQUANTIZEs before each LayerNorm, q, k, v and the pooling; CAST of the int8 embedding rows
    assert ops["int8"] == {"FULLY_CONNECTED": 4, "ADD": 3, "GELU": 1, "DEQUANTIZE": 6, "CAST": 1,
                           "RESHAPE": 6, "SLICE": 3, "TRANSPOSE": 3}, ops["int8"]
    # float, none of which XNNPACK takes in int8: 3 LayerNorms (2 MEAN, SQUARED_DIFFERENCE, ADD, RSQRT, SUB,
    # 2 MUL, ADD each; the untrained unit scale and zero shift fold away), the attention (2 BATCH_MATMUL,
    # the causal mask's ADD, SOFTMAX, the query scale's 2 MULs), the pooling (EQUAL, CUMSUM, 2 MUL, SUM),
    # the text projection (FULLY_CONNECTED by a parameter matrix), the L2 norm (MUL, SUM, POW, MAXIMUM,
    # DIV), the int8 table rows times their scales (MUL); QUANTIZE into the int8 linears and adds
    assert ops["float32"] == {"MEAN": 6, "SQUARED_DIFFERENCE": 3, "RSQRT": 3, "SUB": 3, "ADD": 7, "MUL": 12,
                              "BATCH_MATMUL": 2, "SOFTMAX": 1, "EQUAL": 1, "CUMSUM": 1, "SUM": 2,
                              "FULLY_CONNECTED": 1, "POW": 1, "MAXIMUM": 1, "DIV": 1, "QUANTIZE": 4,
                              "RESHAPE": 16, "TRANSPOSE": 3}, ops["float32"]
    out = run_tflite(path, batches[1][1].numpy())
    sim = quantizer.simulate(prepared)(batches[1][1]).detach()
    assert cosine_to(sim, torch.from_numpy(out)) > 0.995
    assert cosine_to(towers[1](batches[1][1]).detach(), torch.from_numpy(out)) > 0.98


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


@pytest.mark.slow
def test_float_tflite_export_keeps_the_causal_mask_and_masks_stay_float(towers, batches, tmp_path):
    """litert-torch rewrites a module's -inf buffers to -3.4e38 in place: the fp32 exporter converts a
    copy, so a tower quantized later in the same process still has its -inf mask. Masks made of the
    dtype's extreme (``finfo.min``, as many text towers build them) keep their add float too."""
    from edge_msd.families.common.pt2e import finite_inputs
    from edge_msd.families.tflite import convert_float

    text = towers[1]
    convert_float(text, batches[1][0][:1].numpy(), "fp32", tmp_path / "text.tflite")
    assert torch.isneginf(text.attn_mask).any()

    class Masked(nn.Module):
        def __init__(self, fill: float):
            super().__init__()
            self.register_buffer("mask", torch.triu(torch.full((4, 4), fill), 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mask

    for fill, int8_add in ((float("-inf"), False), (torch.finfo(torch.float32).min, False), (-1e4, True)):
        gm = torch.export.export(Masked(fill), (torch.randn(4, 4),)).module()
        add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
        assert finite_inputs(add) is int8_add, fill


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


def test_tensorrt_qdq_onnx_per_channel_runs_in_onnxruntime(towers, batches, tmp_path):
    quantizer = quantizer_for(family("tensorrt").recipe)
    image = towers[0]
    prepared = quantizer.quantize(image, batches[0], keep_float=["visual.conv1"])
    assert "visual.conv1" not in quantizer.layers(prepared)
    assert any(n.endswith("attn.in_proj") for n in quantizer.layers(prepared))  # attention is quantized too
    path = tmp_path / "image.onnx"
    entry = quantizer.write(prepared, batches[0][0], path)
    assert entry["inputs"][0]["shape"][0] == -1
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}

    def scale_len(name: str) -> int:
        t = inits.get(name) or consts.get(name)
        return int(np.prod(t.dims)) if t is not None else 0

    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and scale_len(n.input[1]) > 1]
    assert per_channel and all(a.i == 0 for n in per_channel for a in n.attribute if a.name == "axis")
    out = quantizer.run(path, batches[0][1].numpy())
    fq = prepared.eval()(batches[0][1]).detach()
    np.testing.assert_allclose(out, fq.numpy(), atol=1e-4)
    assert cosine_to(image(batches[0][1]).detach(), torch.from_numpy(out)) > 0.98


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


@pytest.mark.slow
def test_coreml_linear_quantizer_prepare_finalize_convert(towers, batches, tmp_path):
    quantizer = quantizer_for(family("coreml").recipe)
    tower, data = towers[1], batches[1]
    prepared = quantizer.quantize(tower, data, qat=True, n_steps=4)
    assert len(quantizer.layers(prepared)) >= 4
    loss = prepared(data[0]).sum()
    loss.backward()  # trainable fake quant
    quantizer.on_qat_step(prepared, 1, 4)
    final = quantizer.finalize(prepared)
    assert cosine_to(tower(data[1]).detach(), final(data[1]).detach()) > 0.98
    entry = quantizer.write(prepared, data[0][:1], tmp_path / "text.mlpackage")
    assert (tmp_path / "text.mlpackage").is_dir() and entry["precision"] == "int8"


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


@pytest.mark.slow
def test_tflite_dynamic_range_fallback_converts_and_runs(towers, batches, tmp_path):
    quantizer = quantizer_for(family("tflite").recipe)
    dyn = quantizer.quantize_dynamic(towers[0], batches[0])
    entry = quantizer.write(dyn, batches[0][0][:1], tmp_path / "image.tflite")
    assert entry["quantization"] == "dynamic-range" and entry["inputs"][0]["dtype"] == "float32"
    out = run_tflite(tmp_path / "image.tflite", batches[0][1].numpy())
    assert cosine_to(towers[0](batches[0][1]).detach(), torch.from_numpy(out)) > 0.98


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
