"""Options of the benchmark, one definition for ``edge-msd bench`` (click, via ``config_command``) and
the benchmark binary (argparse), the names of its runtimes, and the benchmark defaults a target profile
records (its ``[bench]`` table). Standard library only, so that the CLI and the profile loader import
it cheaply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edge_msd.contract.format import RUNTIMES
from edge_msd.errors import ArtifactError, ConfigError


def _opt(default: Any, help: str) -> Any:  # noqa: A002
    """A dataclass field with CLI help (the metadata ``edge_msd.config.config_command`` reads)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class BenchOptions:
    """Options of ``edge-msd bench`` and of the benchmark binary (one definition for both)."""

    bundle: str = _opt("runs/export/onnx", "deploy bundle folder (what `edge-msd export` wrote)")
    runtime: str | None = _opt(
        None, f"auto | {' | '.join(RUNTIMES)} (default: the profile's [bench] runtime, else auto)"
    )
    provider: str = _opt(
        "cpu",
        "ONNX Runtime execution provider(s), comma-separated: cpu, cuda, tensorrt, "
        "coreml, openvino, … (CPU is always added as fallback)",
    )
    compute_units: str = _opt("all", "Core ML compute units: all | cpu_only | cpu_and_gpu | cpu_and_ne")
    xnnpack: bool = _opt(True, "LiteRT: apply the XNNPACK delegate")
    expect_digest: str | None = _opt(
        None, "refuse the bundle unless its digest (sha256 of the canonical manifest) is this hex value"
    )
    public_key: str | None = _opt(
        None, "Ed25519 public key (PEM): refuse the bundle unless manifest.sig verifies with it "
        "(needs the cryptography package)"
    )
    engine_dir: str | None = _opt(None, "TensorRT: folder with <tower>.plan (default: the bundle's models/)")
    threads: int | None = _opt(
        None, "CPU threads of the runtime (default: the profile's, else the runtime's)"
    )
    batch: list[int] = _opt([], "batch sizes, comma-separated (default: the profile's, else 1)")
    towers: list[str] = _opt(["image", "text"], "towers to benchmark")
    iters: int | None = _opt(None, "timed iterations per measurement (default 100 unless --duration)")
    duration: float | None = _opt(None, "seconds of timed iterations per measurement (instead of --iters)")
    warmup: int | None = _opt(
        None, "untimed warm-up iterations after the first inference (default: the profile's, else 10)"
    )
    pool: int = _opt(8, "distinct input batches rotated during timing")
    recall: bool = _opt(True, "compute Recall@1/5/10 on the bundle's evalset and parity on its probe set")
    eval_limit: int | None = _opt(
        None, "recall on the first N images of the evalset and their captions only (slow devices, "
        "emulation); the report and tables label that recall as a subset"
    )
    query: bool = _opt(True, "time end-to-end queries per stage: decode/tokenize, model at batch 1, search")
    gallery: list[int] = _opt(
        [], "also time the query search over random galleries of these sizes, comma-separated (e.g. 100000)"
    )
    gallery_storage: str = _opt("int8", "storage of the query search's gallery: fp32 | fp16 | int8 | binary")
    time_limit: float | None = _opt(None, "stop after this many seconds and write a partial report")
    sustained: float | None = _opt(
        None, "then run this many seconds more per tower and report p50 per time window (throttling)"
    )
    cold: bool = _opt(True, "measure cold start and the runtime's own memory in a fresh torch-free process")
    vendor: bool = _opt(True, "run the runtime's own benchmark tool (benchmark_model, trtexec, …) if found")
    label: str | None = _opt(None, "device label in merged reports (default: host name)")
    out: str | None = _opt(
        None, "report JSON path (default: runs/bench/<bundle>.json from edge-msd bench, "
        "bench-<target>-<runtime>-<host>.json from the binary)"
    )

    def validate(self) -> None:
        if any(b < 1 for b in self.batch):
            raise ConfigError(f"--batch: batch sizes must be ≥ 1, got {self.batch}")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"--iters must be ≥ 1, got {self.iters}")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError(f"--duration must be > 0, got {self.duration}")
        if self.sustained is not None and self.sustained <= 0:
            raise ConfigError(f"--sustained must be > 0 seconds, got {self.sustained}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"--eval-limit must be ≥ 1 image, got {self.eval_limit}")
        if (self.warmup is not None and self.warmup < 0) or self.pool < 1:
            raise ConfigError("--warmup must be ≥ 0 and --pool ≥ 1")
        if any(n < 1 for n in self.gallery):
            raise ConfigError(f"--gallery: sizes must be ≥ 1, got {self.gallery}")
        unknown = sorted(set(self.towers) - {"image", "text"})
        if unknown:
            raise ConfigError(f"--towers: unknown tower(s) {', '.join(unknown)}; known: image, text")


@dataclasses.dataclass
class ProfileBench:
    """A target profile's ``[bench]`` table: what ``edge-msd bench`` uses where no option is given. The
    profile loader types it (edge_msd.targets); the bundle manifest records it as ``target.bench``."""

    runtime: str | None = _opt(None, f"runtime of the target's files: {', '.join(RUNTIMES)} (else auto)")
    warmup: int | None = _opt(None, "untimed warm-up iterations after the first inference (else 10)")
    iterations: int | None = _opt(None, "timed iterations per measurement (else 100 unless duration)")
    duration: float | None = _opt(None, "seconds of timed iterations per measurement")
    threads: int = _opt(0, "CPU threads of the runtime (0: the runtime's default)")

    def __post_init__(self) -> None:
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ValueError(f"field 'runtime' is {self.runtime!r}; expected one of {', '.join(RUNTIMES)}")
        if (self.warmup is not None and self.warmup < 0) or self.threads < 0:
            raise ValueError("fields 'warmup' and 'threads' must be ≥ 0")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"field 'iterations' must be ≥ 1, got {self.iterations}")

    @classmethod
    def from_manifest(cls, table: dict[str, Any], where: str) -> ProfileBench:
        """The ``target.bench`` a bundle manifest recorded (written by export from a loaded profile)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise ArtifactError(f"{where}: target.bench has unknown field(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(names))}")
        try:
            return cls(**table)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: target.bench: {e}") from e
