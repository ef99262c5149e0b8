#!/usr/bin/env python3
"""Image query from a uint8 frame at model size → embedding, with the normalise on the host (today's
float NCHW contract) or folded into the model (``image_input = "uint8_nhwc"``), against the model alone.

One student is exported twice per family (onnx → ONNX Runtime, tflite fp32 → LiteRT), once per input
contract, into a temp folder. Then one process times, interleaved call by call at batch 1:
  model alone    the float model's runtime call on an already normalised, prepared input;
  host + model   uint8 frame → ``image_model_input`` (normalise) → prepare → the float model;
  fused          uint8 frame → ``image_model_input`` (the frame as it is) → prepare → the fused model;
and prints a Markdown table of medians and each total over the model alone (goal: fused ≤ 1.3×).
Without --student it builds the demo student's preset (edge-s, 64 px) with random weights: latency
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_msd.bench import runtimes  # noqa: E402
from edge_msd.contract.numerics import row_cosine  # noqa: E402
from edge_msd.contract.reading import image_model_input, input_contract, open_bundle  # noqa: E402
from edge_msd.export.bundle import ExportConfig, export_bundle  # noqa: E402
from edge_msd.targets import known_targets  # noqa: E402

FAMILIES = {"onnx": runtimes.OnnxRuntimeBackend, "tflite": runtimes.LiteRtBackend}
DATA = "demo-scenes?n_train=8&n_val=8&n_test=16&size=64"


def random_student(folder: Path, preset: str) -> Path:
    from edge_msd.students.presets import create_student, save_student

    return save_student(create_student(preset), folder / preset, preset)


def export(student: Path, family: str, image_input: str, tmp: Path, dataset) -> Path:
    """A bundle of ``student`` for the packaged ``family`` profile, fp32, asking for ``image_input``;
    export checks its parity with the torch student (through the fused input where it is fused)."""
    text = known_targets()[family].read_text()
    text = text if "[options]" in text else text + "\n[options]\n"
    profile = tmp / f"{family}-{image_input}.toml"
    profile.write_text(text.replace("[options]\n", f'[options]\nimage_input = "{image_input}"\n', 1))
    out = tmp / profile.stem
    export_bundle(ExportConfig(target=str(profile), student=str(student), precision="fp32", out=str(out),
                               probe_images=8, eval_images=8), dataset=dataset)
    return out


def load(bundle_dir: Path, backend: type[runtimes.Backend], threads: int):
    bundle = open_bundle(bundle_dir)
    session = backend().load(bundle.model("image"), bundle.model_path("image"), threads, 1, {})
    return bundle, session


def query(bundle, session) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 frame → embedding as an app does it: the contract's input step, prepare, the model."""
    pre, contract = bundle.manifest["preprocessing"], input_contract(bundle, "image")
    return lambda frame: session.run(session.prepare(image_model_input(frame, pre, contract)))


def time_interleaved(calls: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    samples: dict[str, list[int]] = {k: [] for k in calls}
    for _ in range(iters):
        for name, call in calls.items():
            t0 = time.perf_counter_ns()
            call()
            samples[name].append(time.perf_counter_ns() - t0)
    return {k: statistics.median(v) / 1e6 for k, v in samples.items()}


def measure(family: str, student: Path, tmp: Path, dataset, iters: int, threads: int) -> dict:
    backend = FAMILIES[family]
    host_b, host_s = load(export(student, family, "float_nchw", tmp, dataset), backend, threads)
    fused_b, fused_s = load(export(student, family, "uint8_nhwc", tmp, dataset), backend, threads)
    frames = host_b.load_npz("probe.npz")["images"][:1]
    host_q, fused_q = query(host_b, host_s), query(fused_b, fused_s)
    feed = host_s.prepare(image_model_input(frames, host_b.manifest["preprocessing"],
                                            input_contract(host_b, "image")))
    calls = {"model alone": lambda: host_s.run(feed), "host + model": lambda: host_q(frames),
             "fused": lambda: fused_q(frames)}
    for call in calls.values():  # warm-up
        for _ in range(20):
            call()
    ms = time_interleaved(calls, iters)
    cos = float(row_cosine(fused_q(frames), host_s.run(feed)).min())
    parity = fused_b.manifest["parity"]["image"]["min_cos"]
    return {"family": family, "runtime": backend.name, **ms, "cos": cos, "parity": parity}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", help="student folder (default: the edge-s preset, random weights)")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from edge_msd.data import open_dataset

    dataset = open_dataset(DATA, "test")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        student = Path(args.student) if args.student else random_student(tmp, "edge-s")
        rows = [measure(f, student, tmp, dataset, args.iters, args.threads) for f in FAMILIES]
    print(f"student: {args.student or 'edge-s (random weights)'}, batch 1, {args.threads} thread(s), "
          f"{args.iters} interleaved calls each, medians\n")
    print("| family | runtime | model alone (ms) | host normalise + model (ms) | ratio | fused uint8 "
          "(ms) | ratio | min cos fused vs float | fused parity min cos (probe) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        base = r["model alone"]
        print(f"| {r['family']} fp32 | {r['runtime']} | {base:.4f} | {r['host + model']:.4f} | "
              f"{r['host + model'] / base:.2f}× | {r['fused']:.4f} | {r['fused'] / base:.2f}× | "
              f"{r['cos']:.6f} | {r['parity']:.6f} |")


if __name__ == "__main__":
    main()
