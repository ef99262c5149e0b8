"""The executorch family on the tiny student: .pte with the XNNPACK delegate in fp32 and int8 (PT2E),
parity and delegation in the manifest, QAT hooks, and the device-side runner."""

from __future__ import annotations

import pytest
import torch
from export_helpers import tiny_dataset

pytest.importorskip("executorch", reason="executorch is not installed (pip install edge-msd[executorch])")

from edge_msd.bench.options import BenchOptions  # noqa: E402
from edge_msd.bench.run import run_bench  # noqa: E402
from edge_msd.export.bundle import ExportConfig, export_bundle, verify_bundle  # noqa: E402
from edge_msd.families import family  # noqa: E402
from edge_msd.families.common.quantizer import cosine_to  # noqa: E402
from edge_msd.pipeline import export_target  # noqa: E402
from edge_msd.quant.recipes import quantizer_for  # noqa: E402
from edge_msd.students.towers import load_student_towers  # noqa: E402

pytestmark = pytest.mark.slow  # every test here converts to .pte (a minute each here)

DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, student_dir):
    out = tmp_path_factory.mktemp("b") / "executorch"
    cfg = ExportConfig(target="executorch", student=str(student_dir), out=str(out), probe_images=8)
    return out, export_bundle(cfg, dataset=tiny_dataset())


def test_fp32_pte_parity_and_delegation(fp32_bundle):
    out, m = fp32_bundle
    assert m["parity"]["passed"] and m["parity"]["image"]["min_cos"] > 0.9999, m["parity"]
    assert m["parity"]["text"]["min_cos"] > 0.9999 and m["parity"]["image"]["delta_R@1"] == 0
    image = m["models"]["image"]
    assert image["format"] == "pte" and image["inputs"][0] == {"name": "image", "shape": [1, 3, 32, 32],
                                                               "dtype": "float32", "layout": "NCHW"}
    assert m["models"]["text"]["inputs"][0]["dtype"] == "int32"
    d = image["delegation"]
    assert d["delegate"] == "xnnpack" and 0 < d["delegated_ops"] <= d["ops"]
    assert d["delegated_share"] == round(d["delegated_ops"] / d["ops"], 4)
    assert m["delegate_check"]["image"] == d
    verify_bundle(out)


def test_bench_runner_runs_the_pte_bundle(fp32_bundle, tmp_path):
    out, m = fp32_bundle
    report = run_bench(BenchOptions(bundle=str(out), runtime="executorch", iters=2, warmup=0, pool=1,
                                    threads=1, out=str(tmp_path / "r.json")))
    assert report["runtime"]["name"] == "executorch"
    assert report["parity"]["image"]["min_cos"] > 0.9999 and report["parity"]["text"]["min_cos"] > 0.9999


def test_int8_pte_by_ptq_keeps_recall_of_fp32(tmp_path, student_dir, fp32_bundle):
    from edge_msd.data import open_dataset
    from edge_msd.quant.calibration import build_calibration_set, save_calibration_set

    cal = save_calibration_set(build_calibration_set(open_dataset(DATA, "train"), 32), tmp_path / "cal.json")
    cfg = ExportConfig(target="executorch", student=str(student_dir), precision="int8", data=DATA,
                       out=str(tmp_path / "int8"), probe_images=16, calibration=str(cal))
    m = export_target(cfg)
    p = m["parity"]
    # against the float student on the probe: embeddings close, retrieval recall within the profile's bound
    assert p["passed"] and p["image"]["min_cos"] > 0.9 and abs(p["image"]["delta_R@1"]) <= 10, p
    assert p["text"]["min_cos"] > 0.99, p  # the causal mask stays float (an int8 range cannot hold -inf)
    assert m["quantization"]["recipe"]["name"] == "executorch-xnnpack-int8"
    d = m["models"]["image"]["delegation"]
    assert d["delegate"] == "xnnpack" and d["delegated_ops"] > 0
    assert m["models"]["image"]["precision"] == "int8"
    # the token embedding: int8 rows and their scales gathered on the portable kernels, 3x+ below fp32
    assert m["models"]["text"]["delegation"]["not_delegated"]["aten_embedding_default"] == 2
    text = tmp_path / "int8" / m["models"]["text"]["file"]
    assert text.stat().st_size * 3 < 49408 * 32 * 4


def test_qat_hooks_train_and_freeze_then_lower(tmp_path, student_dir):
    student = load_student_towers(student_dir)
    quantizer = quantizer_for(family("executorch").recipe)
    x = torch.randn(4, 3, 32, 32)
    prepared = quantizer.quantize(student.image, [x], qat=True, n_steps=4)
    prepared(x).sum().backward()  # trainable fake quant
    assert any(p.grad is not None for p in prepared.parameters())
    for step in range(1, 5):
        quantizer.on_qat_step(prepared, step, 4)
    assert prepared.meta["edge_msd"]["bn_frozen"]
    entry = quantizer.write(prepared, x[:1], tmp_path / "image.pte")
    got = quantizer.run(tmp_path / "image.pte", x.numpy())
    assert entry["precision"] == "int8" and cosine_to(student.image(x).detach(), torch.from_numpy(got)) > 0.9


def test_coreml_delegate_variant_lowers_here_and_parity_waits_for_apple(tmp_path, student_dir):
    cfg = ExportConfig(target="executorch-coreml", student=str(student_dir), out=str(tmp_path / "cm"),
                       probe_images=8)
    m = export_bundle(cfg, dataset=tiny_dataset())
    d = m["models"]["image"]["delegation"]
    assert d["delegate"] == "coreml" and d["delegated_ops"] > 0
    assert m["parity"]["passed"] is None and "Apple" in m["parity"]["skipped"]
