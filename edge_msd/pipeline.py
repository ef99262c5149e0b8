"""Stages chained: ``export_target`` (quantize, then export) and ``edge-msd demo``.

The demo runs the whole pipeline on the embedded demo, each stage skipped when already done:
teacher fit (writing the train and test feature caches) → distill (val cache built on the way) →
export per target → bench on this host → report.
Every stage is the same function its own verb calls; this module only chains them, so that each stage
imports only the stages before it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from edge_msd import paths
from edge_msd.config import field
from edge_msd.export.config import ExportConfig
from edge_msd.targets import load_target

console = Console()


@dataclass
class DemoConfig:
    """``edge-msd demo``: run every stage on the embedded demo (offline, CPU)."""

    steps: int | None = field(None, help="distillation steps [default: distill's own default]")
    preset: str = field("edge-s", help="student preset")
    targets: list[str] = field(["onnx", "tflite", "coreml", "jetson"], help="targets to export")
    bench: list[str] = field(["onnx", "tflite"], help="exported targets to benchmark on this host")
    bench_seconds: float = field(
        1.0, help="seconds of timed calls per benchmark measurement (the benchmark's own minimum)"
    )
    force: bool = field(False, help="redo every stage, even those already done")


def export_target(cfg: ExportConfig, dataset: Any = None) -> dict:
    """``edge-msd export``: int8 without ``--quantized`` runs post-training quantization (the quant
    stage, on the calibration set) into a temp folder first, and ships that; returns the manifest.

    Each stage fills its own config from the student's record once: the quant stage the data and
    calibration set it calibrates on (the same fill step export's own config takes), export the rest."""
    from edge_msd.artifacts import read_manifest
    from edge_msd.export.bundle import export_bundle, export_precision

    if cfg.quantized or export_precision(cfg, load_target(cfg.target)) != "int8":
        return export_bundle(cfg, dataset)
    from edge_msd.quant.config import QuantConfig
    from edge_msd.quant.pipeline import KIND, quantize_student

    with tempfile.TemporaryDirectory(prefix="edge-msd-ptq-") as d:
        console.print(f"int8 without --quantized: running post-training quantization (PTQ) for {cfg.target}")
        qcfg = QuantConfig(target=cfg.target, method="ptq", student=str(cfg.student_dir()),
                           calibration=cfg.calibration, data=cfg.data, out=f"{d}/ptq")
        art = quantize_student(qcfg)
        used = read_manifest(art, KIND)["config"]
        console.print(f"calibrated on {used['calibration']} of data {used['data']!r}")
        return export_bundle(cfg, dataset, made_for_export=art)


def _stage(name: str) -> float:
    console.rule(f"[bold]{name}")
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    """Run the stages in order; returns seconds per stage (a finished stage takes ~0 s)."""
    from edge_msd.bench.options import BenchOptions
    from edge_msd.bench.report import merge_reports
    from edge_msd.bench.run import print_report, run_bench
    from edge_msd.distill.config import DistillConfig
    from edge_msd.distill.run import distill_summary, run_distill
    from edge_msd.export.bundle import summary, verify_bundle
    from edge_msd.teachers.demo import fit_demo_teacher, print_fit_summary
    from edge_msd.teachers.demo_config import DemoTeacherConfig

    seconds: dict[str, float] = {}

    t = _stage("1. demo teacher (frozen EfficientNet-Lite0 + MiniLM-L6, LiT heads)")
    # The fit runs the teacher over train and test anyway: it writes their feature caches too.
    print_fit_summary(fit_demo_teacher(DemoTeacherConfig(features=str(paths.FEATURES)), force=cfg.force))
    seconds["teacher"] = time.perf_counter() - t

    t = _stage("2. distill (DSMD) from cached teacher embeddings")
    distill_dir = paths.DISTILL
    if cfg.force or not (distill_dir / "eval.json").is_file():
        overrides = {"steps": cfg.steps} if cfg.steps else {}
        dcfg = DistillConfig(preset=cfg.preset, force=True, **overrides)
        console.print(distill_summary(run_distill(dcfg), dcfg))
    else:
        console.print(f"{distill_dir}/eval.json exists: distillation done (--force to redo)")
    seconds["distill"] = time.perf_counter() - t

    reports = []
    for target in cfg.targets:
        t = _stage(f"3. export --target {target}")
        out = paths.EXPORT / target
        if cfg.force or not _valid_bundle(out, verify_bundle):
            ecfg = ExportConfig(target=target, student=str(paths.STUDENT), precision="",
                                out=str(out), force=True)
            summary(export_target(ecfg), str(out))
        else:
            console.print(f"{out} is a verified bundle: export done (--force to redo)")
        seconds[f"export {target}"] = time.perf_counter() - t
        if target in cfg.bench:
            t = _stage(f"4. bench {target} on this host")
            report_path = paths.BENCH / f"{target}.json"
            options = BenchOptions(bundle=str(out), duration=cfg.bench_seconds, out=str(report_path))
            report = run_bench(options, echo=console.print)
            print_report(report, echo=print)  # plain: rich would re-wrap the table at 80 columns in a log
            reports.append(str(report_path))
            seconds[f"bench {target}"] = time.perf_counter() - t
    if reports:
        t = _stage("5. report")
        for kind, path in merge_reports(reports, str(paths.RUNS / "report")).items():
            console.print(f"{kind}: {path}")
        seconds["report"] = time.perf_counter() - t
    console.rule("done")
    for stage, s in seconds.items():
        console.print(f"{stage:>16}: {s:7.1f} s")
    return seconds


def _valid_bundle(folder: Path, verify) -> bool:
    if not (folder / "manifest.json").is_file():
        return False
    verify(folder)  # a tampered bundle is an error, not something to silently overwrite
    return True
