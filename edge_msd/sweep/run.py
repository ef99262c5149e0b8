"""``edge-msd sweep``: train (or reuse) several students, export and benchmark each on this host, and plot
mean R@1 against latency with the Pareto front marked (``edge_msd.sweep.points``); or plot device reports.

Every stage is the function its own verb calls (distill, export, bench); this module only chains them
per student and skips what is done: a preset whose student in ``out/<preset>/student`` was trained with
the same distill settings is not retrained (an interrupted one resumes), a verified bundle of that
student is not re-exported, and a complete report of that bundle with the same timing settings is reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from edge_msd import paths
from edge_msd.artifacts import MANIFEST
from edge_msd.config import build_config, load_toml
from edge_msd.distill.config import DistillConfig
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.lineage import DEMO_DATA, read_student_record
from edge_msd.sweep.config import SweepConfig
from edge_msd.sweep.points import Point, point_from_report, points_from_files, print_table, write_outputs

console = Console()
LINEAGE = ("teacher", "data", "features")


@dataclass(frozen=True)
class Candidate:
    """One student to measure: its label, its folder and the folder its bundle and report go to."""

    label: str
    student: Path
    work: Path


def run_sweep(cfg: SweepConfig) -> dict[str, Path]:
    """Measure every student (or read the device reports); write sweep.{json,md,png}; returns their paths."""
    cfg.validate()
    if cfg.reports:
        points = points_from_files(cfg.reports, cfg.latency)
        settings: dict[str, Any] = {"source": "device reports", "reports": list(cfg.reports)}
        caption = f"{len(points)} device reports"
    else:
        _runs_here(cfg.target)
        presets = _presets(cfg)
        base = distill_base(cfg)
        candidates = [train_preset(cfg, base, p) for p in presets]
        candidates += [given_student(cfg, s) for s in cfg.students]
        for c in candidates:
            export(cfg, c)
        _same_test_set(candidates, cfg.target)
        points = [bench(cfg, c) for c in candidates]
        settings = {"source": "this host", "target": cfg.target, "threads": cfg.threads, "iters": cfg.iters,
                    "presets": list(presets), "students": list(cfg.students),
                    "distill": {k: getattr(base, k) for k in (*LINEAGE, "steps", "seed")}}
        runtime = points[0].runtime if points else cfg.target
        caption = (f"{runtime} on this host, {cfg.threads} thread(s); presets distilled {base.steps} steps"
                   if presets else f"{runtime} on this host, {cfg.threads} thread(s)")
    written = write_outputs(points, cfg.out_dir(), cfg.latency, settings, caption)
    print_table(points, cfg.latency)
    for kind, path in written.items():
        console.print(f"{kind}: {path}")
    return written


def _runs_here(target: str) -> None:
    """This host times the bundles: a target whose runtime cannot run here is refused before any training."""
    from edge_msd.bench.runtimes import BACKENDS
    from edge_msd.families import declaration
    from edge_msd.targets import load_target

    runtimes = declaration(load_target(target).exporter).runtimes
    reasons = [BACKENDS[r].unavailable_reason() for r in runtimes]
    if all(reasons):
        raise ConfigError(f"field 'target': {target} bundles run on {', '.join(runtimes)}, which cannot run "
                          f"here ({'; '.join(r or '' for r in reasons)}); choose a target whose runtime does "
                          "(onnx, tflite), or bench on the device and plot the reports with --reports")


def _presets(cfg: SweepConfig) -> list[str]:
    """The student specs to train: as given (each parsed, files checked, before any training), else every
    preset unless students were given."""
    from edge_msd.students.presets import list_presets
    from edge_msd.students.spec import parse_student_spec

    if cfg.presets is None:
        return [] if cfg.students else list_presets()
    for spec in cfg.presets:
        try:
            parse_student_spec(spec)
        except ConfigError as e:
            known = ", ".join(list_presets())
            message = f"field 'presets': unknown {spec}; known: {known}, or another form ({e})"
            raise ConfigError(message) from e
    return list(cfg.presets)


def distill_base(cfg: SweepConfig) -> DistillConfig:
    """The distill settings every preset is trained with: ``--distill-config``, then the sweep's own
    options; teacher, data and features as given, else as recorded (``_default_lineage``), else the demo."""
    table: dict[str, Any] = {}
    source = "command line"
    if cfg.distill_config:
        data = load_toml(cfg.distill_config)
        table, source = dict(data.get("distill", data)), f"{cfg.distill_config} [distill]"
    given = {k: getattr(cfg, k) if getattr(cfg, k) is not None else table.get(k) for k in LINEAGE}
    recorded = _default_lineage(cfg, given)
    lineage = {k: given[k] if given[k] is not None else recorded.get(k) for k in LINEAGE}
    own = lineage["data"] is not None or lineage["teacher"] not in (None, "demo")
    if lineage["data"] is None and own:
        raise ConfigError(f"teacher {lineage['teacher']!r} given without data: pass --data SPEC")
    data = lineage["data"] or DEMO_DATA
    # With the user's own data and no teacher, distill takes the train cache's teacher; never the demo's.
    teacher = lineage["teacher"] if lineage["teacher"] is not None else ("demo" if not own else "")
    # Absolute, as students record it: a rerun that takes the root from their record is the same run.
    features = str(Path(lineage["features"] or paths.FEATURES).resolve())
    overrides = {"teacher": teacher, "data": data, "features": features}
    overrides |= {k: getattr(cfg, k) for k in ("steps", "seed") if getattr(cfg, k) is not None}
    return build_config(DistillConfig, {**table, **overrides}, source)


def _default_lineage(cfg: SweepConfig, given: dict[str, str | None]) -> dict[str, str]:
    """Where teacher, data and features not given come from: the ``--students``' records; with none of
    the three given, the students of an earlier sweep in ``--out``, else the folder's distilled student
    (``paths.STUDENT``), so that a sweep in the user's folder never falls back to the demo."""
    if cfg.students:
        return _recorded_lineage(cfg.students, "--students")
    if any(v is not None for v in given.values()):
        return {}
    earlier = sorted(str(m.parent) for m in cfg.out_dir().glob(f"*/student/{MANIFEST}"))
    distilled = paths.STUDENT
    for folders, what in ((earlier, f"the students in {cfg.out}"),
                          ([str(distilled)] if (distilled / MANIFEST).is_file() else [], str(distilled))):
        recorded = _recorded_lineage(folders, what)
        if recorded:
            listed = ", ".join(f"{k} {v}" for k, v in recorded.items())
            console.print(f"as {what} record: {listed} (--teacher, --data, --features to change)")
            return recorded
    return {}


def _recorded_lineage(students: list[str], what: str) -> dict[str, str]:
    """Teacher, data and feature root the given student folders agree on (a disagreement is an error)."""
    out: dict[str, str] = {}
    for name in LINEAGE:
        values: dict[str, str] = {}
        for folder in students:
            if not Path(folder).is_dir():
                raise ArtifactError(f"{folder}: student folder not found ({what})")
            value = getattr(read_student_record(folder), name)
            if value:
                values.setdefault(value, folder)
        if len(values) > 1:
            listed = "; ".join(f"{f}: {v}" for v, f in values.items())
            raise ConfigError(f"{what} record different {name} ({listed}); pass --{name}")
        if values:
            out[name] = next(iter(values))
    return out


def train_preset(cfg: SweepConfig, base: DistillConfig, preset: str) -> Candidate:
    """``out/<preset>``: distilled unless a student of the same settings is there; resumes a cut run."""
    from edge_msd.distill.checkpoint import CKPT_DIR, LAST, run_identity
    from edge_msd.distill.run import distill_summary, run_distill
    from edge_msd.students.spec import spec_folder_name

    run_dir = cfg.out_dir() / spec_folder_name(preset)
    dcfg = replace(base, preset=preset, out=str(run_dir), resume=False, force=False)
    dcfg.validate()
    identity = run_identity(dcfg)
    student = run_dir / paths.STUDENT_FOLDER
    console.rule(f"[bold]{preset}")
    if not cfg.force and not _differences(_json(student / MANIFEST).get("distill_config"), identity):
        console.print(f"{student}: trained with these settings, reused (--force to retrain)")
        return Candidate(preset, student, run_dir)
    saved = _json(run_dir / "config.json")  # written when a distill run starts: its identity
    resume = not cfg.force and (run_dir / CKPT_DIR / LAST).is_file() and not _differences(saved, identity)
    if not resume and saved:
        changed = ", ".join(_differences(saved, identity)) or "--force"
        console.print(f"{run_dir}: another run there ({changed}); training afresh")
    dcfg = replace(dcfg, resume=resume, force=not resume)
    try:
        report = run_distill(dcfg)
    except ConfigError as e:  # distill's messages name its own options; say where a sweep takes them
        raise ConfigError(f"{preset}: {e} (a sweep distils with --teacher, --data, --features, --steps, "
                          "--seed and the [distill] table of --distill-config FILE)") from e
    if report:
        console.print(distill_summary(report, dcfg))
    return Candidate(preset, student, run_dir)


def _json(path: Path) -> dict[str, Any]:
    """A JSON object the sweep wrote earlier, or {} when there is none yet."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not readable JSON ({e}); delete it or pass --force") from e
    return value if isinstance(value, dict) else {}


def _differences(saved: dict[str, Any] | None, identity: dict[str, Any]) -> list[str]:
    """Settings of ``identity`` that ``saved`` lacks or holds otherwise (all when nothing is saved)."""
    saved = saved or {}
    return [k for k, v in identity.items() if k not in saved or saved[k] != v]


def given_student(cfg: SweepConfig, folder: str) -> Candidate:
    """A student folder the user trained: measured as it is, its bundle under ``out/students/``."""
    record = read_student_record(folder)
    if not (record.folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder}: not a student folder (no {MANIFEST}; `edge-msd distill` writes one)")
    preset = _json(record.folder / MANIFEST).get("preset", "student")
    tag = hashlib.sha256(str(record.folder.resolve()).encode()).hexdigest()[:8]
    from edge_msd.students.spec import spec_folder_name

    work = cfg.out_dir() / "students" / f"{spec_folder_name(preset)}-{tag}"
    return Candidate(f"{preset} ({folder})", record.folder, work)


def export(cfg: SweepConfig, c: Candidate) -> None:
    """``c.work/<target>``: a bundle of ``c``'s student, unless a verified one of the same weights is there
    (a tampered bundle is an error, not something to overwrite)."""
    from edge_msd.contract.integrity import check_bundle
    from edge_msd.export.config import ExportConfig
    from edge_msd.pipeline import export_target
    from edge_msd.students.presets import WEIGHTS_FILE

    bundle = c.work / Path(cfg.target).stem
    weights = _json(c.student / MANIFEST).get("files", {}).get(WEIGHTS_FILE)
    done = not cfg.force and (bundle / MANIFEST).is_file()
    if done and check_bundle(bundle).manifest.get("student", {}).get("sha256") == weights:
        console.print(f"{bundle}: a verified bundle of {c.label}, reused")
        return
    console.print(f"{c.label}: exporting for {cfg.target} → {bundle}")
    export_target(ExportConfig(target=cfg.target, student=str(c.student), out=str(bundle), force=True))


def bench(cfg: SweepConfig, c: Candidate) -> Point:
    """Benchmark ``c``'s bundle here at batch 1 (a report of the same bundle and settings is reused)."""
    from edge_msd.bench.options import BenchOptions
    from edge_msd.bench.run import run_bench
    from edge_msd.contract.integrity import check_bundle

    bundle = c.work / Path(cfg.target).stem
    report_path = c.work / f"bench-{bundle.name}.json"
    report = None if cfg.force else _reusable_report(report_path, check_bundle(bundle).digest, cfg)
    if report is None:
        opts = BenchOptions(bundle=str(bundle), threads=cfg.threads, batch=[1], iters=cfg.iters, cold=False,
                            vendor=False, out=str(report_path))
        report = run_bench(opts, echo=console.print)
    else:
        console.print(f"{report_path}: measured with these settings, reused")
    return point_from_report(report, report_path, cfg.latency, label=c.label)


def _reusable_report(path: Path, digest: str, cfg: SweepConfig) -> dict[str, Any] | None:
    """The complete report of this very bundle timed with these settings, else None."""
    report = _json(path)
    settings = report.get("settings") or {}
    same = (not report.get("partial", True) and (report.get("bundle") or {}).get("digest") == digest
            and settings.get("threads") == cfg.threads and settings.get("iters") == cfg.iters
            and settings.get("batches") == [1])
    return report if same else None


def _same_test_set(candidates: list[Candidate], target: str) -> None:
    """Recall of different test sets is not comparable: every bundle must hold the same eval set."""
    sets: dict[tuple, str] = {}
    for c in candidates:
        data = _json(c.work / Path(target).stem / MANIFEST).get("data") or {}
        sets.setdefault((data.get("spec"), data.get("split"), data.get("fingerprint")), c.label)
    if len(sets) > 1:
        listed = "; ".join(f"{label}: {spec} [{split}]" for (spec, split, _), label in sets.items())
        raise ConfigError(f"the students were evaluated on different test sets ({listed}); "
                          "sweep students of one data spec at a time")
