"""Accuracy-latency points from bench reports, their Pareto front, and the table, plot and JSON of them.

A point is one bench report (schema edge-msd-bench/1): mean R@1 on the bundle's eval set, measured from
embeddings the runtime made, against p50 latency at batch 1. Latencies of different devices are not
comparable, so the front is taken per device.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_msd.artifacts import atomic_write_json, atomic_write_text
from edge_msd.bench.report import batch1_p50, load_report
from edge_msd.bench.tables import markdown
from edge_msd.errors import ArtifactError

SCHEMA = "edge-msd-sweep/1"


@dataclass
class Point:
    label: str
    device: str
    runtime: str
    precision: str
    latency_ms: float
    image_p50_ms: float | None
    text_p50_ms: float | None
    mean_r1: float
    i2t_r1: float
    t2i_r1: float
    report: str
    on_front: bool = False


def point_from_report(report: dict[str, Any], path: str | Path, latency: str,
                      label: str | None = None) -> Point:
    """The point of one bench report; a report that cannot give one is an ArtifactError naming the file."""
    if report.get("partial"):
        raise ArtifactError(f"{path}: a partial report ({report.get('interrupted')}); "
                            "run the benchmark again")
    recall = (report.get("recall") or {}).get("eval")
    if not isinstance(recall, dict):
        raise ArtifactError(f"{path}: no recall on the eval set; benchmark a bundle with an evalset and "
                            "without --no-recall")
    if recall.get("subset"):
        sub = recall["subset"]
        raise ArtifactError(f"{path}: recall on the first {sub['n_images']} of {sub['of_images']} eval "
                            "images (--eval-limit) does not compare with whole-set points; bench without it")
    p50 = {t: batch1_p50(report, t) for t in ("image", "text")}
    needed = ("image", "text") if latency == "image+text" else (latency,)
    missing = [t for t in needed if p50[t] is None]
    if missing:
        raise ArtifactError(f"{path}: no batch-1 latency of the {' and '.join(missing)} tower; "
                            "benchmark with --batch 1 and both towers")
    bundle = report.get("bundle") or {}
    precisions = sorted({m.get("precision") or "?" for m in (bundle.get("models") or {}).values()})
    precision = "+".join(precisions) + (f" {bundle['quantization']}" if bundle.get("quantization") else "")
    return Point(
        label=label or f"{bundle.get('student') or Path(path).stem} {precision}",
        device=str((report.get("device") or {}).get("label") or "?"),
        runtime=str((report.get("runtime") or {}).get("name") or "?"),
        precision=precision,
        latency_ms=sum(p50[t] for t in needed),  # type: ignore[misc]
        image_p50_ms=p50["image"],
        text_p50_ms=p50["text"],
        mean_r1=float(recall["mean_R@1"]),
        i2t_r1=float(recall["i2t"]["R@1"]),
        t2i_r1=float(recall["t2i"]["R@1"]),
        report=str(path),
    )


def points_from_files(paths: list[str], latency: str) -> list[Point]:
    """One point per report file (device reports as ``edge-msd report`` merges them)."""
    return [point_from_report(load_report(p), p, latency) for p in paths]


def mark_front(points: list[Point]) -> list[Point]:
    """Set ``on_front`` on the points no other point of the same device beats: one that is at least as
    fast and at least as accurate, and strictly better in one of the two."""
    for p in points:
        p.on_front = not any(
            q.device == p.device
            and q.latency_ms <= p.latency_ms
            and q.mean_r1 >= p.mean_r1
            and (q.latency_ms < p.latency_ms or q.mean_r1 > p.mean_r1)
            for q in points
        )
    return points


TABLE_HEAD = ["student", "device", "runtime", "precision", "image p50 ms", "text p50 ms", "latency ms",
              "i2t R@1", "t2i R@1", "mean R@1", "front"]


def table_rows(points: list[Point]) -> list[list[str]]:
    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    return [[p.label, p.device, p.runtime, p.precision, ms(p.image_p50_ms), ms(p.text_p50_ms),
             f"{p.latency_ms:.3f}", f"{p.i2t_r1:.1f}", f"{p.t2i_r1:.1f}", f"{p.mean_r1:.1f}",
             "★" if p.on_front else ""]
            for p in sorted(points, key=lambda p: (p.device, p.latency_ms))]


def print_table(points: list[Point], latency: str) -> None:
    """A rich table in a terminal, Markdown when piped or redirected."""
    rows = table_rows(points)
    title = f"mean R@1 vs {latency} p50 latency, batch 1 (★ Pareto front per device)"
    if not sys.stdout.isatty():
        print(f"{title}\n\n{markdown(TABLE_HEAD, rows)}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*TABLE_HEAD, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def plot(points: list[Point], latency: str, path: Path, caption: str = "") -> Path:
    """Mean R@1 against latency, one colour per device, the Pareto front as a staircase: the best recall
    within each latency budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for device in sorted({p.device for p in points}):
        mine = [p for p in points if p.device == device]
        front = sorted((p for p in mine if p.on_front), key=lambda p: p.latency_ms)
        (line,) = ax.plot([p.latency_ms for p in front], [p.mean_r1 for p in front], "-", lw=1.5,
                          drawstyle="steps-post", label=f"{device}: Pareto front")
        rest = [p for p in mine if not p.on_front]
        ax.scatter([p.latency_ms for p in front], [p.mean_r1 for p in front], s=60, color=line.get_color(),
                   zorder=3)
        ax.scatter([p.latency_ms for p in rest], [p.mean_r1 for p in rest], s=40, facecolors="none",
                   edgecolors=line.get_color(), zorder=3, label=f"{device}: dominated" if rest else None)
        for p in mine:
            ax.annotate(p.label, (p.latency_ms, p.mean_r1), fontsize=8, xytext=(5, 4),
                        textcoords="offset points")
    ax.set_xlabel(f"{latency} p50 latency, batch 1 (ms)")
    ax.set_ylabel("mean Recall@1 (%)")
    ax.set_title("accuracy vs latency" + (f"\n{caption}" if caption else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.12)  # room for the labels
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def write_outputs(points: list[Point], out: Path, latency: str, settings: dict[str, Any],
                  caption: str = "") -> dict[str, Path]:
    """``sweep.json`` (the points), ``sweep.md`` (the table and the plot) and ``sweep.png`` in ``out``."""
    if not points:
        raise ArtifactError(f"{out}: no points to plot (no presets, students or reports given)")
    mark_front(points)
    paths = {"json": out / "sweep.json", "markdown": out / "sweep.md", "plot": out / "sweep.png"}
    plot(points, latency, paths["plot"], caption)
    atomic_write_json(paths["json"], {"schema": SCHEMA, "latency": latency, "settings": settings,
                                      "points": [asdict(p) for p in points]})
    md = [f"# mean R@1 vs {latency} p50 latency, batch 1", "", caption, "",
          markdown(TABLE_HEAD, table_rows(points)), "", "★: on the Pareto front of its device", "",
          f"![accuracy vs latency]({paths['plot'].name})", ""]
    atomic_write_text(paths["markdown"], "\n".join(md))
    return paths
