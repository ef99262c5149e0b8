#!/usr/bin/env python3
"""Student vs teacher latency per tower on one runtime (ONNX Runtime CPU, batch 1), in one run.

    python tools/bench_student_vs_teacher.py [--bundle runs/export/onnx] [--student runs/distill/student]
                                             [--preset edge-s] [--threads 1] [--torch] [--out FILE.md]

The teacher (``--teacher``, default the demo teacher) is exported to ONNX once and cached under
``runs/bench/teacher-onnx``. The student's towers come from an ONNX deploy bundle (``--bundle``); if
there is none, one is exported from ``--student`` into ``runs/bench/student-onnx``. ``--preset`` instead
benchmarks a RANDOM-WEIGHT student of that preset (latency does not depend on the weights; recall does,
so no recall ratio is given then).

All four sessions are loaded with the benchmark harness's ONNX Runtime backend (same options, same
thread count) and timed with its ``time_loop``: warm-up excluded, inputs rotated over real demo images
and captions (each preprocessed and tokenized the model's own way). The models are timed in blocks,
interleaved round by round in alternating order, so that drift and noisy neighbours hit both alike;
the speed-up is teacher p50 / student p50 over all rounds, with the interquartile range of the
per-round ratios and the ratio of the fastest calls (the least disturbed by other processes) beside
it. Params and FLOPs (torch.utils.flop_counter, batch 1) come from the torch models, the recall ratio
(student mean R@1 / teacher mean R@1) from the distillation's ``eval.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_msd import paths  # noqa: E402
from edge_msd.artifacts import read_manifest, sha256_file  # noqa: E402
from edge_msd.bench import sysinfo  # noqa: E402
from edge_msd.bench.runtimes import OnnxRuntimeBackend, Session  # noqa: E402
from edge_msd.bench.timing import latency_stats, time_loop  # noqa: E402
from edge_msd.contract.format import EVALSET, PROBE, TOWERS  # noqa: E402
from edge_msd.contract.reading import Bundle, open_bundle, tower_inputs  # noqa: E402
from edge_msd.eval.retrieval import first_images  # noqa: E402

WHO = ("teacher", "student")
WEIGHTS = "open_clip_model.safetensors"


@dataclasses.dataclass
class StudentSource:
    """The student bundle to time, the student folder it came from, and whether its weights are random."""

    bundle: Bundle
    folder: Path | None
    random: bool


def teacher_onnx(teacher: Any, out: Path) -> Path:
    """The teacher as an ONNX teacher folder, exported once: a cached export of the same teacher is reused."""
    from edge_msd.teachers.onnx_teacher import KIND, export_onnx_teacher

    if (out / "manifest.json").is_file() and read_manifest(out, kind=KIND).get("source") == teacher.id:
        return out
    print(f"exporting the teacher to ONNX → {out}", file=sys.stderr)
    return export_onnx_teacher(teacher, out, opset=18, force=out.exists())


def export_student(student: Path, out: Path) -> Bundle:
    """An fp32 ONNX bundle of ``student`` at ``out``, re-exported only if made from other weights."""
    from edge_msd.export.bundle import export_bundle
    from edge_msd.export.config import ExportConfig

    if (out / "manifest.json").is_file():
        bundle = open_bundle(out)
        if bundle.manifest["student"]["sha256"] == sha256_file(student / WEIGHTS):
            return bundle
    print(f"exporting {student} to an ONNX bundle → {out}", file=sys.stderr)
    export_bundle(ExportConfig(target="onnx", student=str(student), precision="", out=str(out), force=True))
    return open_bundle(out)


def student_source(args: argparse.Namespace) -> StudentSource:
    """``--preset``: a random-weight student; else ``--bundle``; else a bundle exported from ``--student``."""
    if args.preset:
        import torch

        from edge_msd.lineage import DEMO_DATA
        from edge_msd.students import create_student, save_student

        root = paths.BENCH / f"random-{args.preset}"
        folder = root / paths.STUDENT_FOLDER
        # Saved afresh each time (seed 0: the same bytes, so the export is reused) so that an edited
        # preset is never timed from a stale folder; the data spec names the images to time with.
        torch.manual_seed(0)
        save_student(create_student(args.preset), folder, args.preset, extra_manifest={"data": DEMO_DATA})
        return StudentSource(export_student(folder, root / "onnx"), folder, random=True)
    bundle_dir = Path(args.bundle)
    if (bundle_dir / "manifest.json").is_file():
        bundle = open_bundle(bundle_dir)
        folder = Path(bundle.manifest["student"]["source"])
        return StudentSource(bundle, folder if (folder / WEIGHTS).is_file() else None, random=False)
    student = Path(args.student)
    if not (student / WEIGHTS).is_file():
        raise SystemExit(
            f"no ONNX bundle at {bundle_dir} and no student at {student}: run `edge-msd distill` "
            "(and `edge-msd export --target onnx`), or pass --preset edge-s to time a random-weight student"
        )
    return StudentSource(export_student(student, paths.BENCH / "student-onnx"), student, random=False)


def model_inputs(teacher: Any, bundle: Bundle, n_images: int) -> dict[tuple[str, str], np.ndarray]:
    """Inputs per (model, tower): the first ``n_images`` images of the bundle's eval set and their captions.

    The student's come from the bundle (its numpy preprocessing, its tokens); the teacher's are the same
    images and captions through the teacher's own transform and tokenizer.
    """
    from edge_msd.data import open_dataset

    data = bundle.load_npz(EVALSET) or bundle.load_npz(PROBE)
    n, keep = first_images(data["caption_image_index"], len(data["images"]), n_images)
    texts = [str(t) for t in data["texts"][keep]]
    data = {"images": data["images"][:n], "tokens": data["tokens"][keep]}
    cfg = bundle.manifest.get("config") or {}
    ds = open_dataset(cfg.get("data", "demo-scenes"), cfg.get("split", "test"))
    return {
        ("teacher", "image"): np.stack([teacher.preprocess(ds.load_image(i)).numpy() for i in range(n)]),
        ("teacher", "text"): teacher.tokenize(texts).numpy(),
        ("student", "image"): tower_inputs(bundle, "image", data),
        ("student", "text"): tower_inputs(bundle, "text", data),
    }


def interleaved(
    runs: dict[tuple[str, str], Callable[[Any], Any]],
    pools: dict[tuple[str, str], list[Any]],
    rounds: int,
    iters: int,
    warmup: int,
) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, list[float]]]:
    """Latency stats per (model, tower) over ``rounds`` interleaved blocks, and the per-round speed-ups."""
    keys = list(runs)
    for k in keys:  # warm-up, not timed
        time_loop(runs[k], pools[k], warmup=warmup, iters=0)
    samples: dict[tuple[str, str], list[int]] = {k: [] for k in keys}
    per_round: dict[str, list[float]] = {t: [] for t in TOWERS}
    for r in range(rounds):
        p50 = {}
        for k in keys if r % 2 == 0 else keys[::-1]:
            block = time_loop(runs[k], pools[k], warmup=0, iters=iters).samples_ns
            samples[k] += block
            p50[k] = float(np.median(block))
        for t in TOWERS:
            per_round[t].append(p50["teacher", t] / p50["student", t])
    return {k: latency_stats(v) for k, v in samples.items()}, per_round


def time_onnx(
    teacher_dir: Path, bundle: Bundle, inputs: dict, args: argparse.Namespace
) -> tuple[dict, dict, dict[str, Any]]:
    """ONNX Runtime: all four towers loaded by the harness backend, timed interleaved at batch 1."""
    backend = OnnxRuntimeBackend()
    sessions: dict[tuple[str, str], Session] = {}
    for t in TOWERS:
        sessions["teacher", t] = backend.load({}, teacher_dir / f"{t}.onnx", args.threads, 1, {})
        sessions["student", t] = backend.load(bundle.model(t), bundle.model_path(t), args.threads, 1, {})
    pools = {k: [s.prepare(inputs[k][i : i + 1]) for i in range(len(inputs[k]))] for k, s in sessions.items()}
    stats, per_round = interleaved(
        {k: s.run for k, s in sessions.items()}, pools, args.rounds, args.iters, args.warmup
    )
    return stats, per_round, sessions["student", "image"].describe()


def time_torch(teacher: Any, student_model: Any, inputs: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """The same measurement in PyTorch eager on the CPU (open_clip ``encode_*``, inference mode)."""
    import torch

    torch.set_num_threads(args.threads)
    fns = {
        ("teacher", "image"): teacher.model.encode_image,
        ("teacher", "text"): teacher.model.encode_text,
        ("student", "image"): student_model.encode_image,
        ("student", "text"): student_model.encode_text,
    }
    pools = {k: [torch.from_numpy(x[i : i + 1]) for i in range(len(x))] for k, x in inputs.items()}
    pools = {k: [p.long() if k[1] == "text" else p for p in v] for k, v in pools.items()}
    with torch.inference_mode():
        return interleaved(fns, pools, args.rounds, args.iters, args.warmup)


def sizes(teacher: Any, student_model: Any | None, bundle: Bundle) -> dict[str, dict[str, int | None]]:
    """Params and FLOPs (batch 1) per tower of both models; None for the student without its torch model."""
    from edge_msd.students import tower_flops, tower_params

    h, _ = teacher.image_size
    out = {
        "teacher": {
            **{f"params_{t}": v for t, v in teacher.num_params().items()},
            **{f"flops_{t}": v for t, v in tower_flops(teacher.model, h, teacher.context_length).items()},
        }
    }
    if student_model is None:
        out["student"] = {f"{m}_{t}": None for m in ("params", "flops") for t in TOWERS}
        return out
    size = bundle.manifest["preprocessing"]["size"]
    res = size[0] if isinstance(size, list) else int(size)
    ctx = int(bundle.manifest["tokenizer"]["context_length"])
    out["student"] = {
        **{f"params_{t}": v for t, v in tower_params(student_model).items()},
        **{f"flops_{t}": v for t, v in tower_flops(student_model, res, ctx).items()},
    }
    return out


def recall_ratio(eval_path: Path, src: StudentSource) -> tuple[float | None, str]:
    """Student mean R@1 / teacher mean R@1 from ``eval.json``, and a line saying where it comes from."""
    if src.random:
        return None, "recall ratio: n/a (random-weight student)"
    if not eval_path.is_file():
        return None, f"recall ratio: n/a ({eval_path} not found)"
    ev = json.loads(eval_path.read_text(encoding="utf-8"))

    def mean_r1(side: str) -> float:
        return (ev[side]["i2t"]["R@1"] + ev[side]["t2i"]["R@1"]) / 2

    t, s = mean_r1("teacher"), mean_r1("student")
    line = (
        f"recall (mean of i2t/t2i R@1, {ev.get('data', '?')} [{ev.get('split', '?')}], {eval_path}): "
        f"teacher {t:.2f}, student {s:.2f}"
    )
    evaluated = eval_path.parent / paths.STUDENT_FOLDER / WEIGHTS
    if not evaluated.is_file() or sha256_file(evaluated) != src.bundle.manifest["student"]["sha256"]:
        line += f" — WARNING: {eval_path} evaluated another student than the bundle's"
    return s / t if t else None, line


def _count(v: int | None, unit: float, suffix: str) -> str:
    return "n/a" if v is None else f"{v / unit:.2f}{suffix}"


def table(
    results: dict[str, tuple[dict, dict]], size: dict, ratio: float | None, ratio_line: str
) -> list[str]:
    """Markdown rows: one per runtime and tower."""
    lines = [
        "| runtime | tower | teacher p50 ms | student p50 ms | speed-up (p50) | rounds' speed-up p25–p75 "
        "| speed-up (min) | params teacher → student | FLOPs teacher → student | mean R@1 student/teacher |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runtime, (stats, per_round) in results.items():
        for t in TOWERS:
            tp, sp = stats["teacher", t]["p50"], stats["student", t]["p50"]
            q25, q75 = np.percentile(per_round[t], [25, 75])
            lines.append(
                f"| {runtime} | {t} | {tp:.3f} | {sp:.3f} | **{tp / sp:.2f}×** "
                f"| {q25:.2f}–{q75:.2f}× | {stats['teacher', t]['min'] / stats['student', t]['min']:.2f}× "
                f"| {_count(size['teacher'][f'params_{t}'], 1e6, 'M')} → "
                f"{_count(size['student'][f'params_{t}'], 1e6, 'M')} "
                f"| {_count(size['teacher'][f'flops_{t}'], 1e6, ' MFLOPs')} → "
                f"{_count(size['student'][f'flops_{t}'], 1e6, ' MFLOPs')} "
                f"| {'n/a' if ratio is None else f'{ratio:.3f}'} |"
            )
    lines += ["", ratio_line]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="demo", help="teacher spec (edge_msd.teachers.load_teacher)")
    p.add_argument("--teacher-onnx", default=str(paths.BENCH / "teacher-onnx"), help="teacher export cache")
    p.add_argument("--bundle", default=str(paths.EXPORT / "onnx"), help="student ONNX deploy bundle")
    p.add_argument("--student", default=str(paths.STUDENT), help="student folder, if no bundle")
    p.add_argument("--preset", default=None, help="time a RANDOM-WEIGHT student of this preset instead")
    p.add_argument("--eval", default=str(paths.DISTILL / "eval.json"), help="eval.json with the recall")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, same for every model")
    p.add_argument("--images", type=int, default=16, help="demo images (+ their captions) in the pool")
    p.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    p.add_argument("--iters", type=int, default=25, help="timed calls per model per round")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per model before the first round")
    p.add_argument("--torch", action="store_true", help="also time the torch models (eager, CPU)")
    p.add_argument("--out", default=None, help="also write the Markdown to this file")
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    from edge_msd.students import load_open_clip_student
    from edge_msd.teachers import load_teacher

    teacher = load_teacher(args.teacher)
    teacher_dir = teacher_onnx(teacher, Path(args.teacher_onnx))
    src = student_source(args)
    student_model = load_open_clip_student(src.folder).model if src.folder is not None else None
    inputs = model_inputs(teacher, src.bundle, args.images)

    results = {}
    onnx_stats, onnx_rounds, session_info = time_onnx(teacher_dir, src.bundle, inputs, args)
    results[f"ONNX Runtime {ort.__version__} CPU"] = (onnx_stats, onnx_rounds)
    if args.torch and student_model is not None:
        torch_name = f"torch {torch.__version__.split('+')[0]} eager CPU"
        results[torch_name] = time_torch(teacher, student_model, inputs, args)
    ratio, ratio_line = recall_ratio(Path(args.eval), src)

    student_name = src.bundle.manifest["student"]["name"]
    weights = "RANDOM WEIGHTS: untrained --preset student, latency only" if src.random else "trained"
    n = {k: v["n"] for k, v in onnx_stats.items()}
    lines = [
        "## Student vs teacher latency, batch 1",
        "",
        f"- teacher: `{args.teacher}` ({teacher.id}), ONNX export {teacher_dir}",
        f"- student: `{student_name}` ({weights}), bundle {src.bundle.root}"
        f" (from {src.bundle.manifest['student']['source']})",
        f"- CPU: {sysinfo.cpu_model()}, {sysinfo.environment({}, args.threads)['cpu_usable']} usable cores; "
        f"intra-op threads {args.threads} for every model (ORT: {session_info['providers'][0]})",
        f"- {args.rounds} interleaved rounds × {args.iters} calls per model (n = {min(n.values())} each), "
        f"{args.warmup} warm-up calls excluded; inputs rotated over {len(inputs['teacher', 'image'])} demo "
        f"images / {len(inputs['teacher', 'text'])} captions",
        "- speed-up (p50) = teacher p50 / student p50 over all rounds; rounds' p25–p75: spread of the "
        "per-round p50 ratios; speed-up (min) = ratio of the fastest calls (least disturbed by other load)",
        "",
        *table(results, sizes(teacher, student_model, src.bundle), ratio, ratio_line),
    ]
    if args.torch and student_model is None:
        lines.append("(torch timing skipped: the bundle's student folder is not here)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
