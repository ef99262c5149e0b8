"""Config of ``edge-msd sweep`` (free of torch, so that the CLI's ``--help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_msd import paths
from edge_msd.config import field
from edge_msd.errors import ConfigError

RUNS_SWEEP = Path("runs") / "sweep"
LATENCIES = ("image+text", "image", "text")


@dataclass
class SweepConfig:
    """``edge-msd sweep``: mean R@1 against measured latency for several students, Pareto front marked."""

    presets: list[str] | None = field(
        None, help="student specs to train (or reuse from --out), comma-separated: presets or any form "
        "of distill's --student (open_clip:ARCH[@TAG|@FILE], local-dir:DIR, config:FILE) "
        "[default: all of `edge-msd students`; none when --students or --reports is given]"
    )
    students: list[str] = field([], help="already-trained student folders to include (not retrained)")
    reports: list[str] = field(
        [], help="bench reports (JSON, edge-msd-bench/1) made on devices: plot these instead of training "
        "and benchmarking here"
    )
    teacher: str | None = field(
        None, help="teacher spec, as for distill [default: as recorded (see --data); else the train "
        "cache's teacher when --data is given, the demo teacher when not]"
    )
    data: str | None = field(
        None, help="dataset spec [default: as the --students record it; with none of teacher, data and "
        f"features given, as the students already in --out, else {paths.STUDENT}, record it; "
        "else the demo's]"
    )
    features: str | None = field(
        None, help="feature-cache root [default: as recorded (see --data), else runs/features]"
    )
    distill_config: str | None = field(
        None, help="TOML file with distill options (table [distill]) for every preset trained"
    )
    steps: int | None = field(None, help="distillation steps per preset [default: distill's]")
    seed: int | None = field(None, help="distillation seed [default: distill's]")
    target: str = field("onnx", help="target exported and benchmarked on this host (onnx or tflite)")
    threads: int = field(1, help="CPU threads of the runtime while timing")
    iters: int = field(300, help="timed calls per tower (batch 1)")
    latency: str = field("image+text", help=f"latency plotted: {', '.join(LATENCIES)} (p50, batch 1)")
    out: str = field(str(RUNS_SWEEP), help="output folder: one folder per preset, sweep.{json,md,png}")
    force: bool = field(False, help="retrain, re-export and re-benchmark even what is done")

    def validate(self) -> None:
        if self.latency not in LATENCIES:
            raise ConfigError(f"field 'latency': expected one of {', '.join(LATENCIES)}, "
                              f"got {self.latency!r}")
        if self.threads < 1 or self.iters < 1:
            raise ConfigError(f"fields 'threads' and 'iters' must be ≥ 1, "
                              f"got {self.threads} and {self.iters}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"field 'steps': expected a positive integer, got {self.steps}")
        if self.reports and (self.presets or self.students):
            raise ConfigError("--reports plots device reports as they are; it cannot be combined with "
                              "--presets or --students (bench their bundles on the device first)")

    def out_dir(self) -> Path:
        return Path(self.out)
