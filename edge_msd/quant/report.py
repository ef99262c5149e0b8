"""fp32 vs PTQ vs QAT per target: Recall@1/5 both ways, model size, and (TFLite) int8/fp32 latency.

Each row says what measured it: the target's runtime where it exists here (LiteRT interpreter for
.tflite, ONNX Runtime for the Q/DQ ONNX, ExecuTorch for the .pte) or the fake-quant torch model (Core
ML, which predicts only on macOS), and each tower's size on disk. Quantized artifacts are read from
``runs/qat/<target>`` (QAT) and ``runs/qat/<target>-ptq``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_msd.artifacts import atomic_write_json, atomic_write_text, read_manifest, verify_files
from edge_msd.contract.format import TOWERS
from edge_msd.errors import ArtifactError
from edge_msd.eval.retrieval import first_images, retrieval_metrics
from edge_msd.families.common.quantizer import file_size, quiet
from edge_msd.families.tflite import convert_float, interpreter, model_input
from edge_msd.quant.config import QuantConfig
from edge_msd.quant.pipeline import KIND, STATE_FILE, load_calibration
from edge_msd.quant.recipes import quantizer_for, recipe_for_target


def eval_inputs(
    data: str, split: str, student: Any, n_images: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The first ``n_images`` of a split, all their captions, and each caption's image row."""
    from edge_msd.data import open_dataset

    ds = open_dataset(data, split)
    n, caps = first_images(ds.caption_image_index, ds.n_images, n_images)
    images = torch.stack([student.val_transform(ds.load_image(i)) for i in range(n)])
    tokens = student.tokenizer([ds.captions[j] for j in caps]).to(torch.int32)
    return images, tokens, ds.caption_image_index[caps]


def _recall(img: np.ndarray, txt: np.ndarray, cap_img: np.ndarray) -> dict[str, float]:
    m = retrieval_metrics(img, txt, cap_img, ks=(1, 5))
    return {
        "i2t_R@1": m["i2t"]["R@1"],
        "i2t_R@5": m["i2t"]["R@5"],
        "t2i_R@1": m["t2i"]["R@1"],
        "t2i_R@5": m["t2i"]["R@5"],
        "mean_R@1": m["mean_R@1"],
    }


def _torch_embed(tower: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    tower.eval()
    with torch.no_grad():
        return torch.cat([tower(x[s : s + batch]) for s in range(0, len(x), batch)]).float().numpy()


def invoke_ms(paths: list[Path], x: np.ndarray, threads: int = 1, rounds: int = 400) -> list[float]:
    """Median time of one batch-1 ``invoke`` per .tflite in the LiteRT interpreter (XNNPACK), timed the same
    way for each: the input is set once beforehand in the model's own dtype (an int8 model's quantized with
    its scale, as ``edge-msd bench`` does before its timed loop), and the models take turns call by call, in
    alternating order, so that other jobs on the machine hit them alike (timing blocks of calls instead
    would let the slower model's longer blocks take more of the preemptions)."""
    interps = []
    for path in paths:
        it = interpreter(path, threads)
        detail = it.get_input_details()[0]
        it.set_tensor(detail["index"], model_input(detail, x[:1]))
        it.invoke()  # warm-up: XNNPACK packs its weights on the first call
        interps.append(it)
    times: list[list[float]] = [[] for _ in paths]
    for r in range(rounds):
        for i in range(len(paths)) if r % 2 == 0 else reversed(range(len(paths))):
            t0 = time.perf_counter()
            interps[i].invoke()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(t)) for t in times]


def _tflite_latency(
    s: Any, images: torch.Tensor, tokens: torch.Tensor, variant: str, files: dict[str, Path], threads: int
) -> dict[str, Any]:
    """fp32 .tflite (converted here from the float towers) vs the int8 artifact, same interpreter and run."""
    lat = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t, tower, x in (("image", s.image, images), ("text", s.text, tokens)):
            f32 = Path(tmp) / f"{t}.tflite"
            with quiet():
                convert_float(tower.eval(), x[:1].numpy(), "fp32", f32)
            fp32_ms, int8_ms = invoke_ms([f32, files[t]], x.numpy(), threads=threads)
            lat[t] = {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms}
    total32 = sum(v["fp32_ms"] for v in lat.values())
    total8 = sum(v["int8_ms"] for v in lat.values())
    return {"variant": variant, "threads": threads, "towers": lat, "speedup_both_towers": total32 / total8}


def _fake_quant_towers(
    art: Path, manifest: dict, student: Any, cfg: QuantConfig
) -> dict[str, torch.nn.Module]:
    """Rebuild the fake-quant towers of an artifact (same recipe, calibration, kept layers) + saved state.

    The caller has verified the artifact's hashes; the state is safetensors, so loading it runs no code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if STATE_FILE not in manifest.get("files", {}):
        raise ArtifactError(f"{art}: no {STATE_FILE} in its manifest; re-run `edge-msd qat` (or ptq) --force")
    try:
        state = load_file(art / STATE_FILE)
    except SafetensorError as e:
        raise ArtifactError(f"{art / STATE_FILE}: not a safetensors file ({e})") from e
    quantizer = quantizer_for(recipe_for_target(manifest["target"]))
    calib = load_calibration(cfg, student)
    towers = {}
    for name, tower, batches in (
        ("image", student.image, calib.images),
        ("text", student.text, calib.tokens),
    ):
        prepared = quantizer.quantize(
            tower, batches, qat=manifest["method"] == "qat", keep_float=manifest["towers"][name]["kept_float"]
        )
        prefix = f"{name}."
        own = {k.removeprefix(prefix): t for k, t in state.items() if k.startswith(prefix)}
        prepared.load_state_dict(own)
        towers[name] = quantizer.simulate(prepared.eval())
    return towers


def _artifact_row(
    target: str, variant: str, art: Path, s: Any, eval_set: tuple, cfg: QuantConfig
) -> tuple[dict[str, Any], dict[str, Path], str | None]:
    """One quantized artifact's recall row (its hashes verified before any file is loaded), its tower
    files and the runtime that ran them (None: fake-quant torch)."""
    images, tokens, cap_img = eval_set
    manifest = read_manifest(art, kind=KIND)
    verify_files(art, manifest)  # before any of its files is loaded
    quantizer = quantizer_for(recipe_for_target(manifest["target"]))
    files = {t: art / manifest["towers"][t]["file"] for t in TOWERS}
    if quantizer.runtime:
        emb = {"image": quantizer.run(files["image"], images.numpy()),
               "text": quantizer.run(files["text"], tokens.numpy())}
        how = quantizer.runtime
    else:
        towers = _fake_quant_towers(art, manifest, s, cfg)
        emb = {"image": _torch_embed(towers["image"], images), "text": _torch_embed(towers["text"], tokens)}
        how = "fake-quant torch"
    row = {
        "target": target,
        "variant": variant,
        "measured_with": how,
        "artifact": str(art),
        "size_bytes": {t: file_size(f) for t, f in files.items()},
        "calibration": manifest["calibration"]["name"],
        **_recall(emb["image"], emb["text"], cap_img),
    }
    return row, files, quantizer.runtime


def quant_report(
    targets: list[str],
    *,
    student: str,
    calibration: str,
    data: str,
    out: str | Path = "runs/qat",
    split: str = "test",
    n_images: int = 200,
    threads: int = 1,
) -> dict[str, Any]:
    """Measure every target's fp32 / PTQ / QAT rows; writes ``quant_report.json`` and ``.md`` in ``out``."""
    from edge_msd.students.towers import load_student_towers

    out = Path(out)
    s = load_student_towers(student)
    images, tokens, cap_img = eval_set = eval_inputs(data, split, s, n_images)
    fp32 = {"image": _torch_embed(s.image, images), "text": _torch_embed(s.text, tokens)}
    fp32_row = {"variant": "fp32", "measured_with": "torch fp32",
                "size_bytes": {t: sum(p.numel() * 4 for p in tower.parameters())
                               for t, tower in (("image", s.image), ("text", s.text))},
                **_recall(fp32["image"], fp32["text"], cap_img)}
    rows: list[dict[str, Any]] = []
    latency: dict[str, Any] = {}
    for target in targets:
        timed: tuple[str, dict[str, Path]] | None = None
        rows.append({"target": target, **fp32_row})
        cfg = QuantConfig(target=target, student=student, calibration=calibration, data=data)
        for variant, art in (("ptq", out / f"{target}-ptq"), ("qat", out / target)):
            if not (art / "manifest.json").is_file():
                continue
            row, files, runtime = _artifact_row(target, variant, art, s, eval_set, cfg)
            rows.append(row)
            if runtime == "litert":
                timed = (variant, files)  # QAT is visited last: it wins when both exist
        if timed is not None:
            latency[target] = _tflite_latency(s, images, tokens, *timed, threads=threads)
    report = {
        "student": student,
        "data": data,
        "split": split,
        "n_images": len(images),
        "n_texts": len(tokens),
        "rows": rows,
        "tflite_latency": latency,
    }
    report["markdown"] = markdown(report)
    atomic_write_json(out / "quant_report.json", {k: v for k, v in report.items() if k != "markdown"})
    atomic_write_text(out / "quant_report.md", report["markdown"])
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Retrieval on {report['data']} {report['split']} ({report['n_images']} images, "
        f"{report['n_texts']} captions), Recall in %:",
        "",
        "| target | variant | measured with | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | mean R@1 "
        "| image / text MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['target']} | {r['variant']} | {r['measured_with']} | {r['i2t_R@1']:.1f} | "
            f"{r['i2t_R@5']:.1f} | {r['t2i_R@1']:.1f} | {r['t2i_R@5']:.1f} | {r['mean_R@1']:.1f} | "
            f"{r['size_bytes']['image'] / 1e6:.2f} / {r['size_bytes']['text'] / 1e6:.2f} |"
        )
    for target, lat in report["tflite_latency"].items():
        parts = ", ".join(
            f"{t} {v['fp32_ms']:.2f} → {v['int8_ms']:.2f} ms ({v['speedup']:.2f}×)"
            for t, v in lat["towers"].items()
        )
        lines += [
            "",
            f"{target} ({lat['variant']}) LiteRT batch 1, {lat['threads']} thread(s), median invoke, "
            f"fp32 and int8 alternating: {parts}; "
            f"both towers {lat['speedup_both_towers']:.2f}× faster in int8",
        ]
    return "\n".join(lines) + "\n"
