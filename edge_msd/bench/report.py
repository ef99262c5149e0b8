"""Bench reports: the versioned JSON schema, the table printed on the device, and the merged
Markdown/HTML report across devices (``edge-msd report``; matplotlib is imported only there).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from edge_msd.artifacts import read_json
from edge_msd.bench.placement import PLACEMENT_HEAD, placement_notes, placement_rows
from edge_msd.bench.tables import markdown, render
from edge_msd.contract.format import at
from edge_msd.errors import ArtifactError

SCHEMA = "edge-msd-bench/1"


def _f(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def recall_set_name(name: str, recall: dict[str, Any]) -> str:
    """``eval``, or ``eval subset (first 50 of 1000 images)`` when ``--eval-limit`` cut the set."""
    sub = recall.get("subset")
    return f"{name} subset (first {sub['n_images']} of {sub['of_images']} images)" if sub else name


def _growth(peak: float | None, before: float | None) -> float | None:
    """What one measurement added to the process (its session's load and runs): the runtime's own
    memory, where the process's peak RSS also counts the interpreter, numpy and, on a host, torch."""
    return None if peak is None or before is None else max(0.0, peak - before)


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (tower, batch) measurement, for tables and plots."""
    out = []
    for tower, t in report.get("towers", {}).items():
        for m in t.get("measurements", []):
            lat = m.get("latency_ms") or {}
            out.append(
                {
                    "tower": tower,
                    "batch": m.get("batch"),
                    "load_ms": m.get("load_ms"),
                    "first_ms": m.get("first_inference_ms"),
                    "iters": m.get("iters"),
                    "min": lat.get("min"),
                    "mean": lat.get("mean"),
                    "std": lat.get("std"),
                    "cv": lat.get("cv"),
                    "p50": lat.get("p50"),
                    "p90": lat.get("p90"),
                    "p95": lat.get("p95"),
                    "p99": lat.get("p99"),
                    "ips": m.get("throughput_items_per_s"),
                    "rss": m.get("peak_rss_mb"),
                    "session_mb": _growth(m.get("peak_rss_mb"), m.get("rss_before_mb")),
                    "mj": (m.get("energy") or {}).get("mJ_per_item"),
                    "complete": m.get("complete", False),
                }
            )
    return out


LATENCY_HEAD = [
    "tower",
    "batch",
    "load ms",
    "first ms",
    "n",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "mean±std ms",
    "cv",
    "items/s",
    "session MB",
    "host process peak RSS MB",
    "mJ/item",
]
COLD_HEAD = [
    "tower",
    "import ms",
    "load ms",
    "first ms",
    "runtime import MB",
    "model load MB",
    "peak in inference MB",
]
VENDOR_HEAD = ["tower", "tool", "tool ms", "ours ms", "ours / tool", "verdict (±5%)"]
RAW_HEAD = ["set", "raw inputs", "files MB", "decode ms/image", "token ids differing",
            "mean R@1 host-prepared", "mean R@1 device", "Δ pt", "image emb cos mean/min"]


def latency_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            r["tower"],
            str(r["batch"]),
            _f(r["load_ms"], ".1f"),
            _f(r["first_ms"]),
            str(r["iters"]),
            _f(r["p50"]),
            _f(r["p90"]),
            _f(r["p99"]),
            "–" if r["mean"] is None else f"{r['mean']:.3f}±{r['std']:.3f}",
            _f(r["cv"], ".1%"),
            _f(r["ips"], ".1f"),
            _f(r["session_mb"], ".1f"),
            _f(r["rss"], ".0f"),
            _f(r["mj"], ".2f"),
        ]
        for r in rows(report)
    ]


def cold_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for tower, t in report.get("towers", {}).items():
        c = t.get("cold")
        if c and c.get("available"):
            out.append(
                [
                    tower,
                    _f(c["import_ms"], ".1f"),
                    _f(c["load_ms"], ".1f"),
                    _f(c["first_inference_ms"]),
                    _f(c["runtime_import_mb"], ".1f"),
                    _f(c["model_load_mb"], ".1f"),
                    _f(c["peak_inference_mb"], ".1f"),
                ]
            )
        elif c:
            out.append([tower, "–", "–", "–", "–", "–", f"not measured: {c.get('reason')}"])
    return out


def vendor_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for tower, t in report.get("towers", {}).items():
        v = t.get("vendor")
        if v and "error" in v:
            out.append([tower, v["tool"], "–", "–", "–", f"failed: {v['error']}"])
        elif v:
            out.append(
                [
                    tower,
                    v["tool"],
                    f"{v[v['compared'] + '_ms']:.4f} ({v['compared']})",
                    f"{v['ours_ms']:.4f}",
                    f"{v['ratio']:.3f}",
                    v.get("verdict") or ("agrees" if v["agrees"] else "disagrees"),
                ]
            )
    return out


def raw_rows(report: dict[str, Any]) -> list[list[str]]:
    """Recall from the device's own decode and tokenizer beside the host-prepared inputs, per set."""
    raw = report.get("raw_inputs") or {}
    out = []
    for name, s in raw.get("sets", {}).items():
        if s.get("status") != "measured":
            out.append([name, s.get("status", "?"), *["–"] * 7])
            continue
        tok, cos = s["token_diffs"], s.get("image_cosine")
        out.append([
            name, raw.get("images") or "measured", _f(s["file_bytes"] / 1e6, ".2f"),
            _f(s["decode_ms_per_image"], ".3f"), f"{tok['ids']} ({tok['rows']} of {tok['n_rows']} rows)",
            _f(s.get("mean_R@1_host"), ".2f"), _f(s.get("mean_R@1_device"), ".2f"),
            _f(s.get("delta_mean_R@1"), "+.2f"),
            f"{cos['mean_cos']:.5f} / {cos['min_cos']:.5f}" if cos else "–",
        ])
    return out


QUERY_HEAD = ["query", "stage", "p50 ms", "p90 ms", "share of total p50"]
GALLERY_HEAD = ["gallery", "N", "storage", "k", "search p50 ms", "p90 ms"]
STAGE_LABELS = {"tokenize": "tokenize (warm cache)", "normalise": "normalise (input contract)",
                "tokenize_cold": "tokenize (cold: cache emptied per query)", "model": "model (batch 1)"}
QUERY_STAGES = ("decode", "normalise", "tokenize", "model", "search")  # a query's path, in order
QUERY_ROW_ORDER = (*QUERY_STAGES, "total", "tokenize_cold")  # (reports written with sorted keys)
GOALS = {"image": ("frame_over_model", "uint8 frame → embedding", 1.3),
         "text": ("caption_over_model", "caption → embedding (warm tokenizer)", 1.5)}


def query_rows(report: dict[str, Any]) -> list[list[str]]:
    """End-to-end query latency per direction and stage (or why it was not timed)."""
    q = report.get("query") or {}
    if q.get("skipped"):
        return [["–", f"not measured: {q['skipped']}", "–", "–", "–"]]
    out = []
    for direction in ("image", "text"):
        d = q.get(direction) or {}
        if d.get("skipped"):
            out.append([direction, f"not measured: {d['skipped']}", "–", "–", "–"])
            continue
        stages = d.get("stages", {})
        total = (stages.get("total") or {}).get("p50")
        for stage, st in ((name, stages[name]) for name in QUERY_ROW_ORDER if name in stages):
            share = st["p50"] / total if total and stage not in ("total", "tokenize_cold") else None
            out.append([direction, STAGE_LABELS.get(stage, stage), _f(st["p50"]), _f(st["p90"]),
                        _f(share, ".0%")])
    return out


def query_notes(report: dict[str, Any]) -> list[str]:
    """Each direction's embedding path against the model alone (bench's batch-1 p50), beside its goal."""
    out = []
    for direction, (key, what, goal) in GOALS.items():
        d = (report.get("query") or {}).get(direction) or {}
        if d.get(key) is not None:
            out.append(f"{direction} query: {what} p50 = {d[key]:.2f}× the model alone "
                       f"({d['model_alone_ms']:.3f} ms; goal ≤ {goal}×); search included: "
                       f"{d['total_over_model']:.2f}×; model share of the total {d['model_share']:.0%}")
    return out


def gallery_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[g["source"], str(g["n"]), g["storage"], str(g["k"]), _f(g["search_ms"]["p50"], ".4f"),
             _f(g["search_ms"]["p90"], ".4f")] for g in (report.get("query") or {}).get("gallery", [])]


def warnings(report: dict[str, Any]) -> list[str]:
    """Everything that makes a number doubtful: oversubscribed threads, unstable or short runs, throttling."""
    out = []
    choice = report.get("settings", {}).get("threads_choice") or {}
    if choice.get("warning"):
        out.append(choice["warning"])
    for tower, t in report.get("towers", {}).items():
        for m in t.get("measurements", []):
            out += [f"{tower} batch {m.get('batch')}: {w}" for w in m.get("warnings", [])]
        if (t.get("sustained") or {}).get("warning"):
            out.append(f"{tower} sustained: {t['sustained']['warning']}")
    return out


def format_table(report: dict[str, Any], style: str | None = None) -> str:
    """The human summary printed at the end of a run (``style``: see ``edge_msd.bench.tables``)."""
    rt = report.get("runtime", {})
    env = report.get("environment", {})
    choice = report.get("settings", {}).get("threads_choice") or {}
    threads = report.get("settings", {}).get("threads") or "default"
    lines = [
        f"{report.get('device', {}).get('label')} · {env.get('cpu')} · {rt.get('name')} {rt.get('version')}"
        f" · threads {threads}"
        + (f" ({choice['source']}; {choice['usable_cores']} usable cores)" if choice else "")
    ]
    if report.get("partial"):
        lines.append(f"PARTIAL REPORT ({report.get('interrupted')}): only what was measured is shown")
    sections = [
        ("latency (n timed calls per row)", LATENCY_HEAD, latency_rows(report)),
        ("op placement", PLACEMENT_HEAD, placement_rows(report)),
        (
            "cold start and the runtime's own memory (fresh process without torch)",
            COLD_HEAD,
            cold_rows(report),
        ),
        ("vendor tool beside the harness", VENDOR_HEAD, vendor_rows(report)),
        ("raw inputs: decoded and tokenized here vs prepared on the host", RAW_HEAD, raw_rows(report)),
        ("end-to-end query, one at a time (ms)", QUERY_HEAD, query_rows(report)),
        ("query search per gallery (ms per query)", GALLERY_HEAD, gallery_rows(report)),
    ]
    for title, head, body in sections:
        if body:
            lines += ["", title, render(head, body, style)]
            if head is PLACEMENT_HEAD:
                lines += [f"  {note}" for note in placement_notes(report)]
            if head is QUERY_HEAD:
                lines += [f"  {note}" for note in query_notes(report)]
    for tower, t in report.get("towers", {}).items():
        sus = t.get("sustained")
        if sus and sus.get("windows"):
            p50s = " ".join(f"{w['p50_ms']:.3f}" for w in sus["windows"])
            lines.append(
                f"sustained {tower} ({sus['seconds']:g} s, p50 ms per {sus['window_s']:.2g} s window): {p50s}"
            )
    lines.append("")
    for tower, p in (report.get("parity") or {}).items():
        lines.append(f"parity {tower}: cosine min {p['min_cos']:.5f} mean {p['mean_cos']:.5f} (n={p['n']})")
    for tower, p in (at(report, "raw_inputs", "sets", "probe", "parity") or {}).items():
        lines.append(f"parity {tower}, raw inputs: cosine min {p['min_cos']:.5f} mean {p['mean_cos']:.5f}")
    for name, r in (report.get("recall") or {}).items():
        if isinstance(r, dict):
            lines.append(
                f"recall {recall_set_name(name, r)} ({r['n_images']} images, {r['n_texts']} texts): "
                f"i2t R@1/5/10 {r['i2t']['R@1']:.1f}/{r['i2t']['R@5']:.1f}/{r['i2t']['R@10']:.1f}  "
                f"t2i R@1/5/10 {r['t2i']['R@1']:.1f}/{r['t2i']['R@5']:.1f}/{r['t2i']['R@10']:.1f}"
            )
        else:
            lines.append(f"recall {name}: {r:+.2f}")
    lines += [f"warning: {w}" for w in warnings(report)]
    return "\n".join(lines).rstrip()


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a bench report; another schema (or not a report) is a clear error naming the file."""
    path = Path(path)
    try:
        report = read_json(path)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: report not found") from e
    schema = report.get("schema") if isinstance(report, dict) else None
    if schema is None:
        raise ArtifactError(f"{path}: not an edge-msd bench report (no 'schema' field)")
    if schema != SCHEMA:
        raise ArtifactError(
            f"{path}: report schema {schema!r} is not supported; this edge-msd reads {SCHEMA!r} "
            "(re-run the benchmark with this version, or merge with the edge-msd that wrote it)"
        )
    return report


# ---- merged report -------------------------------------------------------------------------


def _run_name(report: dict[str, Any]) -> str:
    precisions = sorted(
        {m.get("precision") or "?" for m in report.get("bundle", {}).get("models", {}).values()}
    )
    method = report.get("bundle", {}).get("quantization")  # qat | ptq: int8 runs of both are compared
    if method:
        precisions = [f"{p} {method}" if p == "int8" else p for p in precisions]
    rt = report.get("runtime", {})
    extra = (
        f"/{rt.get('provider')}" if rt.get("name") == "onnxruntime" and rt.get("provider") != "cpu" else ""
    )
    return f"{report['device']['label']} · {rt.get('name')}{extra} · {'+'.join(precisions)}"


def _plots(reports: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_run_name(r) for r in reports]
    paths = []
    towers = sorted({t for r in reports for t in r.get("towers", {})})
    for tower in towers:
        data, labels = [], []
        for name, r in zip(names, reports, strict=True):
            for m in r.get("towers", {}).get(tower, {}).get("measurements", []):
                if m.get("samples_ms"):
                    data.append(m["samples_ms"])
                    labels.append(f"{name}\nbatch {m['batch']}")
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(data)), 4.5))
        top = latency_axis_top(data)
        ax.violinplot([[v for v in d if v <= top] for d in data], showmedians=True)
        ax.set_ylim(0, top)
        ax.set_xticks(range(1, len(data) + 1), labels, fontsize=7)
        ax.set_ylabel("latency per call (ms)")
        hidden = sum(v > top for d in data for v in d)
        ax.set_title(f"{tower} tower: latency distribution\n(axis to the highest p99 × 1.2; "
                     f"{hidden} slower calls above it, not drawn)", fontsize=9)
        paths.append(_save(plt, fig, out / f"latency_{tower}.png"))
    for plot in (_sustained_plot, _query_plot):
        path = plot(plt, names, reports, out)
        if path is not None:
            paths.append(path)
    points = []
    for name, r in zip(names, reports, strict=True):
        rec = (r.get("recall") or {}).get("eval") or (r.get("recall") or {}).get("probe")
        p50 = [v for t in r.get("towers", {}) if (v := batch1_p50(r, t)) is not None]
        if rec and p50:
            points.append((name, sum(p50), rec["mean_R@1"]))
    if points:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, lat, r1 in points:
            ax.scatter(lat, r1, s=40)
            ax.annotate(name, (lat, r1), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("image + text p50 latency, batch 1 (ms)")
        ax.set_ylabel("mean Recall@1 (%)")
        ax.set_title("recall vs latency per device / runtime / precision")
        paths.append(_save(plt, fig, out / "recall_vs_latency.png"))
    return paths


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write (110 dpi) and close one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_axis_top(data: list[list[float]]) -> float:
    """The latency plots' axis: to the highest 99th percentile (× 1.2) of the runs drawn, so that one
    slow outlier does not flatten every distribution onto the axis."""
    import numpy as np

    return 1.2 * max(float(np.percentile(d, 99)) for d in data)


def batch1_p50(report: dict[str, Any], tower: str) -> float | None:
    """The tower's p50 latency at batch 1 in ``report``, or None where it was not measured."""
    for m in report.get("towers", {}).get(tower, {}).get("measurements", []):
        if m.get("batch") == 1 and (m.get("latency_ms") or {}).get("p50") is not None:
            return float(m["latency_ms"]["p50"])
    return None


def _sustained_plot(plt: Any, names: list[str], reports: list[dict[str, Any]], out: Path) -> Path | None:
    """p50 per window of every ``--sustained`` run: throttling shows as a rising line."""
    series = [
        (f"{name} · {tower}" + (f" · {s['power_mode']}" if s.get("power_mode") else ""), s["windows"])
        for name, r in zip(names, reports, strict=True)
        for tower, t in r.get("towers", {}).items()
        if (s := t.get("sustained")) and s.get("windows")
    ]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, wins in series:
        ax.plot([w["t_s"] for w in wins], [w["p50_ms"] for w in wins], marker="o", label=label)
    ax.set_xlabel("time into the sustained run (s)")
    ax.set_ylabel("p50 latency per window (ms)")
    ax.set_title("sustained run: p50 per time window")
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "sustained.png")


def _query_plot(plt: Any, names: list[str], reports: list[dict[str, Any]], out: Path) -> Path | None:
    """One bar per run × query direction: its stages' p50 stacked, so the model's share shows."""
    bars = [(f"{name}\n{direction} query".replace(" · ", "\n"), d["stages"])  # narrow labels
            for name, r in zip(names, reports, strict=True)
            for direction in ("image", "text")
            if (d := (r.get("query") or {}).get(direction)) and d.get("stages")]
    if not bars:
        return None
    stages = [s for s in QUERY_STAGES if any(s in b for _, b in bars)]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(bars)), 5))
    bottom = [0.0] * len(bars)
    for stage in stages:
        heights = [(b.get(stage) or {}).get("p50") or 0.0 for _, b in bars]
        ax.bar(range(len(bars)), heights, bottom=bottom, label=STAGE_LABELS.get(stage, stage))
        bottom = [a + h for a, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.set_ylabel("p50 per stage (ms), stacked")
    ax.set_title("end-to-end query: p50 per stage, one query at a time")
    ax.legend(fontsize=7)
    return _save(plt, fig, out / "query_stages.png")


def _per_run(reports: list[dict[str, Any]], make_rows: Any) -> list[list[str]]:
    return [[_run_name(r), *row] for r in reports for row in make_rows(r)]


def note_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[note] for note in placement_notes(report)]


def recall_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, rec in (report.get("recall") or {}).items():
        if isinstance(rec, dict):
            out.append(
                [
                    recall_set_name(name, rec),
                    *(_f(rec[d][k], ".2f") for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")),
                ]
            )
    for tower, p in (report.get("parity") or {}).items():
        out.append(
            [f"parity {tower}", f"min cos {p['min_cos']:.5f}", f"mean cos {p['mean_cos']:.5f}", *[""] * 4]
        )
    return out


def _html(tables: list[tuple[str, list[str], list[list[str]]]], plots: list[Path]) -> str:
    h = [
        "<!doctype html><meta charset='utf-8'><title>edge-msd benchmark report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child{text-align:left}</style>",
        "<h1>edge-msd benchmark report</h1>",
    ]
    for title, head, body in tables:
        h.append(
            f"<h2>{html.escape(title)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in head)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
            + "</table>"
        )
    for p in plots:  # embedded, so the HTML is one file to share
        data = base64.b64encode(p.read_bytes()).decode()
        h.append(f"<h3>{html.escape(p.stem)}</h3><img alt='{p.stem}' src='data:image/png;base64,{data}'>")
    return "\n".join(h) + "\n"


def merge_reports(paths: list[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Merge bench reports of several devices into ``report.md`` and ``report.html`` with plots."""
    from edge_msd.artifacts import atomic_write_text

    if not paths:
        raise ArtifactError("no report files given")
    reports = [load_report(p) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(reports, out)

    runs = [
        [
            _run_name(r),
            r.get("environment", {}).get("cpu") or "?",
            r.get("environment", {}).get("os") or "?",
            str(r.get("settings", {}).get("threads") or "default"),
            ("partial: " + str(r.get("interrupted"))) if r.get("partial") else "complete",
            str(p),
        ]
        for r, p in zip(reports, paths, strict=True)
    ]
    tables = [
        ("Runs", ["run", "CPU", "OS", "threads", "status", "file"], runs),
        ("Latency (ms) and throughput", ["run", *LATENCY_HEAD], _per_run(reports, latency_rows)),
        ("Op placement", ["run", *PLACEMENT_HEAD], _per_run(reports, placement_rows)),
        ("Op placement notes", ["run", "note"], _per_run(reports, note_rows)),
        ("Cold start and the runtime's own memory", ["run", *COLD_HEAD], _per_run(reports, cold_rows)),
        ("Vendor tool beside the harness", ["run", *VENDOR_HEAD], _per_run(reports, vendor_rows)),
        ("Raw inputs decoded and tokenized on the device", ["run", *RAW_HEAD], _per_run(reports, raw_rows)),
        ("End-to-end query (ms)", ["run", *QUERY_HEAD], _per_run(reports, query_rows)),
        ("End-to-end query against the model alone", ["run", "note"],
         _per_run(reports, lambda r: [[n] for n in query_notes(r)])),
        ("Query search per gallery (ms per query)", ["run", *GALLERY_HEAD], _per_run(reports, gallery_rows)),
        (
            "Recall (%) and parity",
            ["run", "set", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10"],
            _per_run(reports, recall_rows),
        ),
    ]
    tables = [t for t in tables if t[2]]  # sections no run measured (no vendor tool, say) are left out
    md = ["# edge-msd benchmark report", ""]
    for title, head, body in tables:
        md += [f"## {title}", "", markdown(head, body), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")

    html_path = out / "report.html"
    atomic_write_text(html_path, _html(tables, plots))
    return {"markdown": md_path, "html": html_path, **{p.stem: p for p in plots}}
