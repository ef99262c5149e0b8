"""The ``edge-msd`` command line: one verb per pipeline stage; each parses, then calls one function.

Heavy imports (torch, open_clip, converters) happen inside the verbs so that ``--help`` is fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edge_msd import __version__
from edge_msd.errors import EdgeMSDError, storage_message
from edge_msd.quiet import known_noise_hidden


class _Group(click.Group):
    """Runs a verb with known-harmless third-party noise hidden (unless -v); problems the user can fix
    become one line on stderr and exit status 2: an EdgeMSDError, or an OSError such as a read-only
    or full disk (other exceptions are bugs and keep their traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            with known_noise_hidden(not ctx.params.get("verbose")):
                return super().invoke(ctx)
        except EdgeMSDError as e:
            _fail(str(e))
        except OSError as e:
            message = storage_message(e)
            if message is None:
                raise
            _fail(message)


WIDTH_WITHOUT_TERMINAL = 240


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edge-msd")
@click.option("-v", "--verbose", is_flag=True,
              help="also show the known-harmless warnings and log lines of third-party libraries")
def main(verbose: bool) -> None:
    """Distil a CLIP-style teacher into a small student, quantize and export it per device, and
    benchmark it on the device.

    \b
    teacher ─▶ features ─▶ distill ─▶ qat ─▶ export ─▶ bundle ─▶ bench on device
    """
    if "COLUMNS" not in os.environ and not any(os.isatty(fd) for fd in (0, 1, 2)):
        # no terminal at all (a log file, CI): rich would wrap every table at 80 columns; one line per row
        os.environ["COLUMNS"] = str(WIDTH_WITHOUT_TERMINAL)


# ==== data, teachers, feature cache ===============================================

from edge_msd.config import config_command  # noqa: E402
from edge_msd.teachers.features_config import FeaturesConfig  # noqa: E402


@main.command("features")
@config_command(FeaturesConfig, section="features")
def features_cmd(cfg: FeaturesConfig) -> None:
    """Run the teacher once over a dataset split and cache its image and text embeddings (resumable;
    shards split by rank under torchrun)."""
    from edge_msd.teachers.cache import features_from_config

    out = features_from_config(cfg)
    click.echo(f"feature cache: {out}")


from edge_msd.data.summary import DataConfig  # noqa: E402


@main.command("data")
@click.argument("spec_arg", metavar="[SPEC]", required=False)
@config_command(DataConfig, section="data")
def data_cmd(cfg: DataConfig, spec_arg: str | None) -> None:
    """Open a dataset spec (KIND[:PATH][?key=value&...]) and summarise one split.

    \b
    Kinds: demo-scenes, fashion-mnist, csv:FILE.csv|.tsv, coco:dataset_coco.json,
    flickr30k:dataset_flickr30k.json, wds:/data/{000000..000009}.tar
    """
    from edge_msd.data.summary import print_summary

    if spec_arg:
        cfg.spec = spec_arg
    print_summary(cfg)


from edge_msd.teachers.demo_config import DemoTeacherConfig  # noqa: E402


@main.group("teacher")
def teacher_grp() -> None:
    """Teachers: build the embedded demo teacher, inspect any teacher spec."""


@teacher_grp.command("fit")
@config_command(DemoTeacherConfig, section="teacher")
@click.option("--force", is_flag=True, help="rebuild even if the demo teacher is already built")
def teacher_fit_cmd(cfg: DemoTeacherConfig, force: bool) -> None:
    """Build the demo teacher: pre-trained EfficientNet-Lite0 + MiniLM towers (locked) with projection
    heads aligned on the demo train split (LiT); writes recall and an attribute probe to eval.json."""
    from edge_msd.teachers.demo import fit_demo_teacher, print_fit_summary

    print_fit_summary(fit_demo_teacher(cfg, force=force))


@teacher_grp.command("info")
@click.argument("spec", default="demo")
@click.option("--device", default="cpu", show_default=True, help="torch device")
def teacher_info_cmd(spec: str, device: str) -> None:
    """Print a teacher's id, embedding size, parameters and preprocessing.

    \b
    SPEC: open_clip:MODEL@PRETRAINED | local-dir:/path | onnx:/path | demo (default)
    """
    from edge_msd.teachers import print_teacher_info

    print_teacher_info(spec, device)


# ==== students, distillation, evaluation ==========================================

from edge_msd.distill.config import DistillConfig, EvalConfig  # noqa: E402  (torch-free)


@main.command("students")
def students_cmd() -> None:
    """List the student presets: params and FLOPs per tower, resolution, context length (`edge-msd sweep`
    trains them and plots their recall against measured latency)."""
    from edge_msd.students.presets import print_presets_table

    print_presets_table()
    click.echo("other students: distill --student open_clip:ARCH[@TAG|@FILE], local-dir:DIR or config:FILE "
               "(any open_clip architecture, checkpoint or model config; --image-size N)")
    click.echo("to choose one by recall and measured latency: edge-msd sweep (trains, exports, benchmarks)")


@main.command("distill")
@config_command(DistillConfig, section="distill")
def distill_cmd(cfg: DistillConfig) -> None:
    """Distil the teacher's cached embeddings into a student (DSMD); with no options, the demo."""
    from edge_msd.distill.run import distill_summary, run_distill

    report = run_distill(cfg)
    if report:
        click.echo(distill_summary(report, cfg))


@main.command("eval")
@config_command(EvalConfig, section="eval")
def eval_cmd(cfg: EvalConfig) -> None:
    """Retrieval recall (and zero-shot accuracy when the data has labels) of a teacher or a student."""
    from edge_msd.artifacts import atomic_write_json
    from edge_msd.distill.run import evaluate_model, print_eval

    cfg = cfg.resolved()
    result = evaluate_model(cfg.model, cfg.data, cfg.split)
    print_eval(result)
    if cfg.json:
        atomic_write_json(cfg.json, result)


# ==== quantization, calibration ===================================================
from edge_msd.quant.config import CalibrateConfig, QuantConfig  # noqa: E402


@main.command("calibrate")
@config_command(CalibrateConfig, section="calibrate")
def calibrate_cmd(cfg: CalibrateConfig) -> None:
    """(Re)build a calibration-set manifest (stratified sample ids, seed, sha256) of the student's data,
    by default at runs/calibration/<data>.json, where qat, ptq and export look for it."""
    from edge_msd.data import open_dataset
    from edge_msd.quant.calibration import build_calibration_set, cache_bad_images, save_calibration_set
    from edge_msd.teachers.features_config import feature_split_dir

    cfg = cfg.resolved()
    dataset = open_dataset(cfg.data, cfg.split, skip_bad=True)  # bad samples are left out and counted
    bad = cache_bad_images(feature_split_dir(cfg.features, cfg.split, "--features"), dataset)
    cs = build_calibration_set(
        dataset, cfg.n, cfg.seed, cfg.name, min_samples=cfg.min_samples, bad_images=bad
    )
    save_calibration_set(cs, cfg.out)
    click.echo(f"{cfg.out}: {cs.n} samples of {cfg.data!r} {cfg.split} ({cs.strategy}, seed {cfg.seed}), "
               f"sha256 {cs.sha256[:16]}…")


def _quantize(cfg: QuantConfig, report: bool) -> None:
    from edge_msd.quant.pipeline import quantize_student

    out = quantize_student(cfg)  # fills its config from the student's record
    click.echo(f"{out}: {cfg.method} int8 student for target {cfg.target!r}")
    if report:
        from edge_msd.artifacts import read_manifest
        from edge_msd.lineage import read_student_record
        from edge_msd.quant.pipeline import KIND
        from edge_msd.quant.report import quant_report

        used = read_manifest(out, KIND)["config"]  # the data and calibration set it was quantized on
        test_split = read_student_record(cfg.student).split("test", "test")
        click.echo(quant_report([cfg.target], student=cfg.student, calibration=used["calibration"],
                                data=used["data"], split=test_split, out=out.parent)["markdown"])


@main.command("qat")
@config_command(QuantConfig, section="quant")
@click.option("--report", is_flag=True, help="then measure fp32 vs int8 recall (quant_report.json + table)")
def qat_cmd(cfg: QuantConfig, report: bool) -> None:
    """Quantization-aware fine-tuning per target (the distillation losses, fake quant), or --method ptq."""
    _quantize(cfg, report)


@main.command("ptq")
@config_command(QuantConfig, section="quant")
@click.option("--report", is_flag=True, help="then measure fp32 vs int8 recall (quant_report.json + table)")
def ptq_cmd(cfg: QuantConfig, report: bool) -> None:
    """Post-training int8 quantization per target, calibrated on a calibration set (no training)."""
    import dataclasses

    _quantize(dataclasses.replace(cfg, method="ptq"), report)


# ==== targets, export, bundles, engines ===========================================
@main.command("targets")
def targets_cmd() -> None:
    """List the device profiles (targets/*.toml): exporter, precisions, batch, resolution."""
    from rich.console import Console
    from rich.table import Column, Table

    from edge_msd.targets import known_targets, load_target

    # target names are what users type: never broken over lines
    table = Table(Column("target", no_wrap=True), "exporter", "precision", "batch", "resolution",
                  "description")
    for name in known_targets():
        p = load_target(name)
        alias = f" → {p.name}" if p.name != name else ""
        batch = ("dynamic " if p.dynamic_batch else "static ") + ",".join(map(str, p.batch_sizes))
        table.add_row(name + alias, p.exporter, f"{p.precision} ({'/'.join(p.precisions)})", batch,
                      str(p.resolution), p.description)
    Console().print(table)


from edge_msd.export.config import ExportConfig  # noqa: E402  (torch-free)


@main.command("export")
@config_command(ExportConfig, section="export")
def export_cmd(cfg: ExportConfig) -> None:
    """Export the student for a target into a verified deploy bundle (docs/bundle.md); with
    --quantized, ship the int8 student that `edge-msd qat` / `ptq` made for that target."""
    from edge_msd.export.bundle import summary
    from edge_msd.pipeline import export_target

    summary(export_target(cfg), str(cfg.out_dir()))


@main.group("bundle")
def bundle_group() -> None:
    """Deploy bundles."""


@bundle_group.command("verify")
@click.argument("path", type=click.Path(exists=True))
@click.option("--expect-digest", metavar="HEX", default=None,
              help="refuse the bundle unless its digest (sha256 of the canonical manifest) is HEX")
@click.option("--public-key", type=click.Path(dir_okay=False), default=None,
              help="Ed25519 public key (PEM): refuse the bundle unless manifest.sig verifies with it")
def bundle_verify_cmd(path: str, expect_digest: str | None, public_key: str | None) -> None:
    """Check a bundle by the rules the benchmark applies: kind and schema, every path inside the bundle,
    every file's sha256, no unlisted file; print its digest (docs/bundle.md)."""
    from edge_msd.export.bundle import verify_bundle

    checked = verify_bundle(path, expect_digest, public_key)
    m = checked.manifest
    click.echo(f"ok: {path} ({len(m['files'])} files, target {m['target']['name']})")
    click.echo(f"digest: {checked.digest}")
    if checked.signature:
        sig = checked.signature
        click.echo(f"signature: {sig['algorithm']}, key {sig['key_id']}, verified")


@bundle_group.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False))
@click.option("--public", "public_key", type=click.Path(dir_okay=False), default=None,
              help="public key file [default: PRIVATE_KEY with .pub.pem]")
def bundle_keygen_cmd(private_key: str, public_key: str | None) -> None:
    """Make an Ed25519 key pair for signing bundles: PRIVATE_KEY (PEM, mode 0600; keep it secret) and its
    public key (PEM; give it to the devices)."""
    from edge_msd.contract.signing import generate_keys

    private = Path(private_key)
    public = Path(public_key or private.with_name(private.name.removesuffix(".pem") + ".pub.pem"))
    kid = generate_keys(private, public)
    click.echo(f"private key: {private}\npublic key: {public}\nkey id: {kid}")


@bundle_group.command("sign")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--key", "private_key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Ed25519 private key (PEM, from `edge-msd bundle keygen`)")
def bundle_sign_cmd(bundle: str, private_key: str) -> None:
    """Verify a bundle, then sign its digest: writes BUNDLE/manifest.sig (and re-packs BUNDLE.tar.gz if
    there is one); check with `bundle verify --public-key` or `bench --public-key`."""
    from edge_msd.export.bundle import sign_bundle

    sig = sign_bundle(bundle, private_key)
    click.echo(f"signed: {bundle} (digest {sig['digest']}, key {sig['key_id']})")


from edge_msd.bench.engine import OPTIONS as ENGINE_OPTIONS  # noqa: E402  (torch-free)
from edge_msd.bench.engine import build_engines  # noqa: E402


@main.command("build-engine")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", default=None, help=ENGINE_OPTIONS["precision"][1])
@click.option("--workspace-mib", type=int, default=None, help=ENGINE_OPTIONS["workspace_mib"][1])
@click.option("--dla-core", type=int, default=None, help=ENGINE_OPTIONS["dla_core"][1])
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help=ENGINE_OPTIONS["timing_cache"][1])
def build_engine_cmd(bundle: str, precision: str | None, workspace_mib: int | None, dla_core: int | None,
                     timing_cache: str | None) -> None:
    """Build TensorRT engines (models/*.plan) for a jetson bundle; run this on the Jetson (torch-free: the
    benchmark binary does the same with `python3 edge-msd-bench.pyz build-engine BUNDLE`)."""
    built = build_engines(Path(bundle), precision, workspace_mib, dla_core,
                          Path(timing_cache) if timing_cache else None)
    for tower, plan in built.items():
        click.echo(f"{tower}: {plan}")


# ==== on-device benchmark and reports =============================================

from edge_msd.bench.options import BenchOptions  # noqa: E402


@main.command("bench")
@config_command(BenchOptions, section="bench")
def bench_cmd(cfg: BenchOptions) -> None:
    """Benchmark a deploy bundle on this machine (the same code as the benchmark binary
    edge-msd-bench.pyz): latency, throughput, memory, power, recall and parity → JSON report.
    Exit status 3 after --time-limit, 130 after Ctrl-C (the partial report is written)."""
    from pathlib import Path

    from edge_msd.bench.run import print_report, run_bench
    from edge_msd.paths import BENCH

    if cfg.out is None:  # runs/export/<target> → runs/bench/<target>.json
        cfg.out = str(BENCH / f"{Path(cfg.bundle).name}.json")
    report = run_bench(cfg, echo=click.echo)
    print_report(report, echo=click.echo)
    if report["partial"]:
        sys.exit(130 if report["interrupted"] == "Ctrl-C" else 3)


from edge_msd.bench.gallery import IndexOptions  # noqa: E402  (torch-free)


@main.command("index")
@config_command(IndexOptions, section="index")
def index_cmd(cfg: IndexOptions) -> None:
    """Embed a gallery (the bundle's eval split, or --images FOLDER) with the bundle's own runner into a
    searchable index (fp32, fp16, int8, binary) with recall of each storage against fp32 exact search
    (docs/index.md; the benchmark binary does the same: `python3 edge-msd-bench.pyz index`)."""
    from edge_msd.bench.gallery import build_index, format_index
    from edge_msd.paths import RUNS

    out = Path(cfg.out) if cfg.out else RUNS / "index" / Path(cfg.bundle).name
    click.echo(format_index(build_index(cfg, out), out))


@main.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default="runs/report", show_default=True, type=click.Path(file_okay=False),
              help="folder for report.md, report.html and the plots")
def report_cmd(reports: tuple[str, ...], out_dir: str) -> None:
    """Merge bench reports (JSON, schema edge-msd-bench/1) from several devices into Markdown and HTML
    with plots: latency distributions, recall vs latency per device and precision."""
    from edge_msd.bench.report import merge_reports

    written = merge_reports(list(reports), out_dir)
    for kind, path in written.items():
        click.echo(f"{kind}: {path}")

# ==== the whole pipeline on the embedded demo ==============================================


from edge_msd.pipeline import DemoConfig  # noqa: E402


@main.command("demo")
@config_command(DemoConfig, section="demo")
def demo_cmd(cfg: DemoConfig) -> None:
    """Run the whole pipeline on the embedded demo: teacher fit, distill, export per target, bench on
    this host, report. Finished stages are skipped, so a re-run resumes."""
    from edge_msd.pipeline import run_demo

    run_demo(cfg)


from edge_msd.sweep.config import SweepConfig  # noqa: E402  (torch-free)


@main.command("sweep")
@config_command(SweepConfig, section="sweep")
def sweep_cmd(cfg: SweepConfig) -> None:
    """Choose a student by accuracy and latency: train (or reuse) each preset, export and benchmark it on
    this host, then plot mean R@1 against p50 latency with the Pareto front marked
    (sweep.{png,json,md}); or plot device bench reports (--reports). Finished presets are skipped."""
    from edge_msd.sweep.run import run_sweep

    run_sweep(cfg)


if __name__ == "__main__":
    main()
