"""fp32 vs PTQ vs QAT per target → runs/qat/quant_report.json + quant_report.md (docs/results.md).

    python tools/bench_quant.py --targets tflite,jetson,coreml,executorch [--student runs/distill/student]

Reads the artifacts `edge-msd ptq` / `edge-msd qat` left in runs/qat/<target>[-ptq]; each row says whether
the target's runtime (LiteRT, ONNX Runtime, ExecuTorch) or the fake-quant torch model measured it.
"""

from __future__ import annotations

import click

from edge_msd import paths


@click.command()
@click.option(
    "--targets", default="tflite,jetson,coreml,executorch", show_default=True, help="comma-separated targets"
)
@click.option(
    "--student", default=str(paths.STUDENT), show_default=True, help="fp32 student folder"
)
@click.option(
    "--calibration",
    default=None,
    help="calibration set (rebuilds fake-quant models for targets without a runtime here) "
    "[default: runs/calibration/<data>.json; for demo-scenes the shipped set]",
)
@click.option("--data", default="demo-scenes", show_default=True, help="dataset spec")
@click.option("--split", default="test", show_default=True, help="evaluation split")
@click.option("--n-images", type=int, default=500, show_default=True, help="evaluation images")
@click.option(
    "--threads", type=int, default=1, show_default=True, help="LiteRT threads for the latency ratio"
)
@click.option("--out", default=str(paths.QAT), show_default=True, help="folder with the quantized artifacts")
def main(
    targets: str, student: str, calibration: str | None, data: str, split: str, n_images: int, threads: int,
    out: str,
) -> None:
    from edge_msd.lineage import calibration_path
    from edge_msd.quant.report import quant_report

    report = quant_report(
        [t for t in targets.split(",") if t],
        student=student,
        calibration=calibration or str(calibration_path(data)),
        data=data,
        out=out,
        split=split,
        n_images=n_images,
        threads=threads,
    )
    click.echo(report["markdown"])


if __name__ == "__main__":
    main()
