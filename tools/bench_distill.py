"""Benchmark the distillation: student vs teacher latency, cached vs online training throughput, ablation.

    python tools/bench_distill.py latency   [--teacher demo] [--preset edge-s | --student DIR]
    python tools/bench_distill.py throughput [--steps 30] [--rounds 3] [--threads 1]
    python tools/bench_distill.py ablation  [--steps 900] [--seeds 0,1,2] [--only 0,2] [--out runs/ablation]
    python tools/bench_distill.py all

Everything runs in one process so that ratios are measured side by side on the same machine state:
torch on the CPU, one thread, batch 1 for latency (median of many calls after warm-up). Markdown
tables go to stdout and, with ``--md FILE``, to a file.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from edge_msd.distill.config import DSMD_LOSSES, DistillConfig
from edge_msd.distill.run import count_params, write_eval
from edge_msd.distill.trainer import train
from edge_msd.students import (
    create_student,
    load_open_clip_student,
    preset_config,
    student_transform,
    tower_params,
)


def _median_ms(fn, reps: int = 200, warmup: int = 20) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


def _teacher_tower_params(teacher: Any) -> tuple[int | None, int | None]:
    model = getattr(teacher, "model", None)
    if model is not None and hasattr(model, "visual"):
        image = count_params(model.visual)
        return image, count_params(model) - image
    return None, count_params(teacher)


def latency(teacher_spec: str, preset: str, student_dir: str | None, reps: int) -> str:
    from edge_msd.data import open_dataset
    from edge_msd.teachers import load_teacher

    torch.set_num_threads(1)
    ds = open_dataset("demo-scenes", "test")
    image, caption = ds.load_image(0), ds.captions[0]
    teacher = load_teacher(teacher_spec)
    if student_dir:
        st = load_open_clip_student(student_dir)
        student, s_pre, s_tok, name = st.model, st.preprocess, st.tokenizer, f"student {st.preset}"
    else:
        import open_clip

        cfg = preset_config(preset)
        student, s_pre, name = create_student(preset).eval(), student_transform(cfg), f"student {preset}"
        s_tok = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    t_x, t_tok = teacher.preprocess(image)[None], teacher.tokenize([caption])
    s_x, s_t = s_pre(image)[None], s_tok([caption])
    towers = {
        "image": (lambda: teacher.encode_image(t_x), lambda: student.encode_image(s_x), t_x, s_x),
        "text": (lambda: teacher.encode_text(t_tok), lambda: student.encode_text(s_t), t_tok, s_t),
    }
    ms = {
        tower: (_median_ms(t_fn, reps), _median_ms(s_fn, reps))
        for tower, (t_fn, s_fn, _, _) in towers.items()
    }
    t_params = dict(zip(towers, _teacher_tower_params(teacher), strict=True))
    s_params = tower_params(student)
    rows = [
        (
            tower,
            *ms[tower],
            t_params[tower],
            s_params[tower],
            _flops(t_fn),
            _flops(s_fn),
            tuple(t_in.shape),
            tuple(s_in.shape),
        )
        for tower, (t_fn, s_fn, t_in, s_in) in towers.items()
    ]
    lines = [
        f"### Latency, batch 1, torch {torch.__version__} CPU, 1 thread ({name} vs teacher {teacher_spec})",
        "",
        "| tower | teacher ms | student ms | speed-up | teacher params | student params | "
        "teacher MFLOPs | student MFLOPs | teacher input | student input |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for tower, t_ms, s_ms, tp, sp, tf, sf, ti_shape, si_shape in rows:
        lines.append(
            f"| {tower} | {t_ms:.2f} | {s_ms:.2f} | {t_ms / s_ms:.1f}x | {_m(tp)} | {_m(sp)} | "
            f"{tf / 1e6:.1f} | {sf / 1e6:.1f} | {ti_shape} | {si_shape} |"
        )
    return "\n".join(lines) + "\n"


def _m(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M"


class _Clock:
    """Wall and process CPU-time stamps (all threads of this process): CPU time is what the other
    jobs on a shared machine disturb least, wall time is what a user waits."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def stamp(self, *_: Any) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def rates(self, batch: int, warmup: int = 2) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second) from the end of step ``warmup`` to the
        last step (the first steps allocate)."""
        n = batch * (len(self.wall) - 1 - warmup)
        return n / (self.wall[-1] - self.wall[warmup]), n / (self.cpu[-1] - self.cpu[warmup])


def _ceiling_clock(run: Any, steps: int) -> _Clock:
    """The trainer's student, losses, balancer, queue and optimizer on one batch already in memory:
    no data gathering, metrics or progress bar."""
    from edge_msd.distill.losses import distill_losses

    x, tokens, t_img, t_txt, img_ids, cap_ids = run.batches(0)
    clip = run.cfg.grad_clip if run.cfg.grad_clip > 0 else float("inf")
    clock = _Clock()
    for _ in range(steps):
        run.optimizer.zero_grad(set_to_none=True)
        s_img, s_txt = run.forward(x, tokens)
        losses = distill_losses(s_img, s_txt, t_img, t_txt, img_ids, cap_ids, run.queue, run.loss_cfg)
        total, _ = run.balancer(losses)
        if run.queue is not None:
            run.queue.enqueue(t_img, t_txt, img_ids, cap_ids)
        total.backward()
        torch.nn.utils.clip_grad_norm_(run.trainable(), clip)
        run.optimizer.step()
        clock.stamp()
    return clock


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def throughput(cfg: DistillConfig, steps: int, rounds: int, threads: int, out: Path) -> str:
    """samples/s of training from the cache, of the same student on tensors in memory (the ceiling) and
    of cached training plus the teacher's forward pass per batch (online), in interleaved rounds
    (cached and ceiling take turns going first), in wall time and in this process's CPU time."""
    from edge_msd.data import open_dataset
    from edge_msd.distill.trainer import prepare_run
    from edge_msd.teachers import load_teacher

    torch.set_num_threads(threads)
    run_cfg = replace(
        cfg, steps=steps, out=str(out), val_split=None, test_split=None, force=True,
        eval_every=10**6, ckpt_every=10**6, warmup_steps=1,
    )
    b = cfg.batch_size
    teacher = load_teacher(cfg.teacher)
    ds = open_dataset(cfg.data, cfg.train_split)
    x = torch.stack([teacher.preprocess(ds.load_image(i)) for i in range(b)])
    first = ds.caption_image_index.argsort(kind="stable")[: b * cfg.captions_per_image]
    caps = [ds.captions[int(j)] for j in first]

    def teacher_batch() -> None:
        with torch.inference_mode():
            teacher.encode_image(x)
            teacher.encode_text(teacher.tokenize(caps))

    def cached() -> tuple[float, float]:
        clock = _Clock()
        train(run_cfg, on_step=clock.stamp, progress=False)
        return clock.rates(b)

    def ceiling() -> tuple[float, float]:
        # A fresh run each round, as ``train`` builds one: a run that has lived longer in this process
        # can find the allocator's free memory laid out better and page-fault less (see docs/results.md).
        ceiling_dir = out / "ceiling"
        run = prepare_run(replace(run_cfg, out=str(ceiling_dir)), ceiling_dir, torch.device("cpu"))
        return _ceiling_clock(run, steps).rates(b)

    teacher_batch()  # warm-up
    # per round: (ceiling, cached, online) samples/s, in wall time and in CPU time
    wall: list[tuple[float, float, float]] = []
    cpu: list[tuple[float, float, float]] = []
    for r in range(rounds):
        order = (cached, ceiling) if r % 2 == 0 else (ceiling, cached)
        got = {fn: fn() for fn in order}
        clock = _Clock()
        for _ in range(3):
            clock.stamp()
            teacher_batch()
        clock.stamp()
        t_wall, t_cpu = (b / rate for rate in clock.rates(b, warmup=0))  # seconds per batch
        (ce_w, ce_c), (ca_w, ca_c) = got[ceiling], got[cached]
        wall.append((ce_w, ca_w, b / (b / ca_w + t_wall)))
        cpu.append((ce_c, ca_c, b / (b / ca_c + t_cpu)))
    lines = [
        f"### Training throughput (batch {b}, {cfg.preset}, torch CPU, {threads} thread(s), {rounds} "
        f"interleaved rounds of {steps} steps, median)",
        "",
        "| mode | samples/s (wall) | of ceiling | samples per CPU-s | of ceiling |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    names = [
        "ceiling: the same student, losses and optimizer on tensors in memory",
        "`distill` from cached teacher features",
        "teacher online (cached + the teacher's forward of each batch)",
    ]
    w_med = [float(np.median(col)) for col in zip(*wall, strict=True)]
    c_med = [float(np.median(col)) for col in zip(*cpu, strict=True)]
    for name, w, c in zip(names, w_med, c_med, strict=True):
        lines.append(f"| {name} | {w:.1f} | {w / w_med[0]:.0%} | {c:.1f} | {c / c_med[0]:.0%} |")
    w_ratio = [ca / ce for ce, ca, _ in wall]
    c_ratio = [ca / ce for ce, ca, _ in cpu]
    lines += [
        "",
        f"cached / ceiling per round: wall {_spread(w_ratio)} (median {np.median(w_ratio):.2f}), "
        f"CPU time {_spread(c_ratio)} (median {np.median(c_ratio):.2f}). "
        f"cached / online: {w_med[1] / w_med[2]:.1f}x wall, {c_med[1] / c_med[2]:.1f}x CPU time.",
        "",
        "Per round, wall samples/s (ceiling, cached, online): "
        + "; ".join(f"{c:.0f}, {d:.0f}, {o:.0f}" for c, d, o in wall),
    ]
    return "\n".join(lines) + "\n"


ABLATIONS = [
    ("defaults (contrastive, hard_negative, affinity; EMA 0.99)", {}),
    ("without EMA", {"ema_decay": 0.0}),
    ("without affinity", {"losses": ["contrastive", "hard_negative"]}),
    ("+ feature and similarity", {"losses": [*DSMD_LOSSES, "affinity"]}),
    ("DSMD's four losses, EMA 0.99", {"losses": DSMD_LOSSES}),
    ("DSMD's four losses, no EMA (the defaults before)", {"losses": DSMD_LOSSES, "ema_decay": 0.0}),
    ("fixed equal weights", {"balancer": "fixed"}),
]


def _spread(values: list[float]) -> str:
    """'x' for one value, 'mean ± half the range' for several."""
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def _recall_cells(reports: list[dict[str, Any]]) -> str:
    """i2t R@1 | t2i R@1 | mean R@1 | R-sum over the runs' eval.json model entries."""
    return " | ".join(_spread([r[k] if k in ("mean_R@1", "rsum") else r[k]["R@1"] for r in reports])
                      for k in ("i2t", "t2i", "mean_R@1", "rsum"))


def ablation(cfg: DistillConfig, steps: int, out: Path, only: list[str] | None, seeds: list[int]) -> str:
    """Each row trained once per seed from the defaults with the row's changes; mean ± half the range."""
    lines = [
        f"### Ablation ({cfg.preset}, {steps} steps, batch {cfg.batch_size}, seeds "
        f"{', '.join(map(str, seeds))}, test split of {cfg.data}; mean ± half the range over seeds)",
        "",
        "| setting | i2t R@1 | t2i R@1 | mean R@1 | R-sum | kept of teacher | mean R@1 per seed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    teacher_line = None
    for i, (name, kw) in enumerate(ABLATIONS):
        if only and str(i) not in only:
            continue
        reports = []
        for seed in seeds:
            run = replace(cfg, steps=steps, seed=seed, out=str(out / f"a{i}-s{seed}"), force=True, **kw)
            run.validate()
            reports.append(write_eval(run, train(run, progress=False)))
        s, t = [r["student"] for r in reports], reports[0]["teacher"]
        kept = statistics.fmean(x["mean_R@1"] for x in s) / t["mean_R@1"]
        teacher_line = f"| teacher | {_recall_cells([t])} | 100% | |"
        per_seed = ", ".join(f"{x['mean_R@1']:.1f}" for x in s)
        lines.append(f"| {name} | {_recall_cells(s)} | {100 * kept:.0f}% | {per_seed} |")
        click.echo(lines[-1], err=True)
    if teacher_line:
        lines.insert(4, teacher_line)
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("what", type=click.Choice(["latency", "throughput", "ablation", "all"]))
@click.option("--teacher", default="demo", show_default=True)
@click.option("--preset", default="edge-s", show_default=True)
@click.option("--student", "student_dir", default=None, help="a trained student folder (latency)")
@click.option(
    "--steps", type=int, default=None, help="steps (throughput: 30 per round; ablation: the distill default)"
)
@click.option("--reps", type=int, default=200, show_default=True, help="latency calls per tower")
@click.option("--rounds", type=int, default=3, show_default=True, help="throughput: interleaved rounds")
@click.option(
    "--threads", type=int, default=1, show_default=True,
    help="throughput: torch threads (1 is steadier on a machine others share)",
)
@click.option("--only", default=None, help="ablation rows to run, comma-separated indices")
@click.option("--seeds", default="0", show_default=True, help="ablation: seeds per row, comma-separated")
@click.option("--out", default="runs/bench_distill", show_default=True)
@click.option("--features", default=None, help="feature-cache root [default: DistillConfig's]")
@click.option("--md", "md_file", default=None, help="also write the Markdown here")
def cli(
    what: str,
    teacher: str,
    preset: str,
    student_dir: str | None,
    steps: int | None,
    reps: int,
    rounds: int,
    threads: int,
    only: str | None,
    seeds: str,
    out: str,
    features: str | None,
    md_file: str | None,
) -> None:
    cfg = DistillConfig(teacher=teacher, preset=preset)
    if features:
        cfg = replace(cfg, features=features)
    cfg.validate()
    parts = []
    if what in ("latency", "all"):
        parts.append(latency(teacher, preset, student_dir, reps))
    if what in ("throughput", "all"):
        parts.append(throughput(cfg, steps or 30, rounds, threads, Path(out) / "throughput"))
    if what in ("ablation", "all"):
        rows = only.split(",") if only else None
        parts.append(ablation(cfg, steps or cfg.steps, Path(out), rows, [int(x) for x in seeds.split(",")]))
    text = "\n".join(parts)
    click.echo(text)
    if md_file:
        Path(md_file).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    cli()
