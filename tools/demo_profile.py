"""Profile and time the two slow stages of ``edge-msd demo``, old code against new, paired.

    python tools/demo_profile.py compare --base /path/to/old/checkout [--rounds 2] [--steps 60] [--images 512]
    python tools/demo_profile.py profile distill|teacher [--steps 60] [--images 512]

``compare`` runs each stage in a fresh process per source tree (``PYTHONPATH`` = that tree), in
alternation (base, new, new, base, ...), and reports wall time and the child's CPU time
(user + sys, from ``resource.getrusage``): on a shared machine CPU time is the steadier number.
Stages, at reduced size (the demo's own batch sizes, data and models):

- ``teacher``: the demo teacher's locked image tower over ``--images`` train images, its locked text
  tower over their captions, and 2 epochs of the LiT heads on what those gave.
- ``distill``: ``--steps`` optimizer steps of the demo's distillation (edge-s, batch 128, the demo
  train split) from a feature cache of random unit vectors of the demo teacher's width (256): the
  per-step cost does not depend on what the teacher vectors are.

``profile`` prints torch.profiler's top operators of one stage in this process.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

DATA = "demo-scenes"
TEACHER_DIM = 256


def _fake_caches(root: Path, splits: tuple[str, ...]) -> None:
    """Feature caches of random unit vectors for ``splits`` of the demo data (a stand-in teacher)."""
    from edge_msd.data import open_dataset
    from edge_msd.teachers.cache import write_feature_cache

    rng = np.random.default_rng(0)
    for split in splits:
        ds = open_dataset(DATA, split)
        sizes = (ds.n_images, ds.n_captions)
        img, txt = (rng.standard_normal((n, TEACHER_DIM), dtype=np.float32) for n in sizes)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        write_feature_cache("random-unit-vectors", ds, root / split, img, txt)


def run_distill(steps: int, work: Path) -> None:
    """``steps`` steps of the demo's distillation loop (validation and checkpoints on their schedule)."""
    import torch

    from edge_msd.distill.config import DistillConfig
    from edge_msd.distill.trainer import _loop, prepare_run

    features = work / "features"
    if not (features / "val" / "manifest.json").is_file():
        _fake_caches(features, ("train", "val"))
    cfg = DistillConfig(teacher=None, features=str(features), out=str(work / "distill"), test_split=None,
                        steps=steps, force=True, device="cpu")
    run = prepare_run(cfg, Path(cfg.out), torch.device("cpu"))
    _loop(run, None, progress=False)


def run_teacher(images: int, work: Path) -> None:
    """The demo teacher fit's tower caching over ``images`` train images and 2 epochs of its heads."""
    from dataclasses import replace

    from edge_msd.data import open_dataset
    from edge_msd.teachers import demo
    from edge_msd.teachers.demo_config import DemoTeacherConfig

    cfg = DemoTeacherConfig(epochs=2)
    train = open_dataset(f"{DATA}?n_train={images}", "train")
    model = demo.build_model(cfg, work)
    tokenizer = demo._tokenizer(demo.minilm_dir(), cfg.context_length)
    feats = demo.cache_image_features(model, train, cfg)
    states, masks = demo.cache_text_states(model, tokenizer(train.captions), cfg)
    demo.train_heads(model, feats, states, masks, train.caption_image_index, replace(cfg, batch_size=256))


def _child(stage: str, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="demo-profile-") as d:
        start = time.perf_counter()
        (run_distill if stage == "distill" else run_teacher)(size, Path(d))
        wall = time.perf_counter() - start
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": use.ru_utime + use.ru_stime}))


def _timed(tree: Path, stage: str, size: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "child", stage, str(size)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@click.group()
def cli() -> None:
    pass


@cli.command("child", hidden=True)
@click.argument("stage", type=click.Choice(["distill", "teacher"]))
@click.argument("size", type=int)
def child(stage: str, size: int) -> None:
    _child(stage, size)


@cli.command()
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False), help="old source tree")
@click.option("--new", default=str(Path(__file__).resolve().parents[1]), show_default=True,
              type=click.Path(exists=True, file_okay=False), help="new source tree")
@click.option("--stages", default="teacher,distill", show_default=True)
@click.option("--rounds", default=2, show_default=True, help="pairs per stage (ABBA order)")
@click.option("--steps", default=60, show_default=True, help="distillation steps per run")
@click.option("--images", default=512, show_default=True, help="train images of the teacher stage")
def compare(base: str, new: str, stages: str, rounds: int, steps: int, images: int) -> None:
    """Paired old/new runs per stage; ratios base/new of wall and CPU time (> 1: new is faster)."""
    for stage in stages.split(","):
        size = steps if stage == "distill" else images
        got: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
        for r in range(rounds):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            for name in order:
                got[name].append(_timed(Path(base if name == "base" else new), stage, size))
                print(f"{stage} round {r} {name}: {got[name][-1]}", flush=True)
        for key in ("wall_s", "cpu_s"):
            ratios = [b[key] / n[key] for b, n in zip(got["base"], got["new"], strict=True)]
            b_med = statistics.median(x[key] for x in got["base"])
            n_med = statistics.median(x[key] for x in got["new"])
            print(f"{stage} {key}: base median {b_med:.1f}, new median {n_med:.1f}, "
                  f"base/new per pair {', '.join(f'{x:.2f}' for x in ratios)}")


@cli.command()
@click.argument("stage", type=click.Choice(["distill", "teacher"]))
@click.option("--steps", default=30, show_default=True)
@click.option("--images", default=512, show_default=True)
@click.option("--rows", default=20, show_default=True)
def profile(stage: str, steps: int, images: int, rows: int) -> None:
    """torch.profiler's operators of one stage, by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run, size = (run_distill, steps) if stage == "distill" else (run_teacher, images)
    cpu = [ProfilerActivity.CPU]
    with tempfile.TemporaryDirectory(prefix="demo-profile-") as d, torch_profile(activities=cpu) as prof:
        run(size, Path(d))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


if __name__ == "__main__":
    cli()
