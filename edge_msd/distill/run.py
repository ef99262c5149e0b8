"""``edge-msd distill`` and ``edge-msd eval``: train, then compare student and teacher on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_msd.artifacts import atomic_write_json
from edge_msd.distill.config import DistillConfig
from edge_msd.distill.images import decode_images, split_preprocess
from edge_msd.distill.splits import open_split
from edge_msd.distill.trainer import TrainResult, train
from edge_msd.distill.validation import encode_split
from edge_msd.eval.retrieval import retrieval_metrics, subset_metrics, zero_shot_accuracy
from edge_msd.students.spec import run_model_config
from edge_msd.torchrun import launch_rank


def count_params(obj: Any) -> int | None:
    """Parameters of a module, or of the distinct modules a wrapper (e.g. a teacher adapter) holds."""
    if isinstance(obj, nn.Module):
        return sum(p.numel() for p in obj.parameters())
    seen: dict[int, nn.Parameter] = {}
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(value, nn.Module):
            seen.update({id(p): p for p in value.parameters()})
    return sum(p.numel() for p in seen.values()) if seen else None


def _side(metrics: dict, params: int | None) -> dict:
    keep = ("i2t", "t2i", "rsum", "mean_R@1", "n_images", "n_texts")
    return {**{k: metrics[k] for k in keep}, "params": params}


def run_distill(cfg: DistillConfig) -> dict:
    """Train, then write ``out/eval.json``: teacher (from its cache) vs student on the test split."""
    result = train(cfg)
    if not cfg.test_split or launch_rank() != 0:  # one writer of eval.json, on a shared filesystem too
        return {}
    return write_eval(cfg, result)


def distill_summary(report: dict, cfg: DistillConfig) -> str:
    """One line comparing teacher and student on the held-out split of ``eval.json``."""
    t, s = report["teacher"], report["student"]
    return (f"{cfg.test_split}: teacher mean R@1 {t['mean_R@1']:.1f}, student {s['mean_R@1']:.1f} "
            f"({100 * (report['kept_mean_R@1'] or 0):.0f}% kept); wrote {cfg.out}/eval.json")


def write_eval(cfg: DistillConfig, result: TrainResult) -> dict:
    to_uint8, mean, std = result.preprocess
    size = int(run_model_config(cfg.preset, cfg.image_size, cfg.init)["vision_cfg"]["image_size"])
    test = open_split(
        cfg, cfg.test_split, result.teacher, result.teacher_id, to_uint8, size, result.tokenizer
    )
    cache = test.cache
    device = next(result.model.parameters()).device
    images, captions, targets = test.usable()  # images the cache marked bad are left out, and counted
    s_img, s_txt = encode_split(
        result.model, test.images.get(images), test.tokens[torch.from_numpy(captions)], mean, std, device
    )
    t_img, t_txt = cache.image(images), cache.text(captions)
    teacher = retrieval_metrics(t_img, t_txt, targets)
    student = retrieval_metrics(s_img, s_txt, targets)
    report = {
        "split": cfg.test_split,
        "data": cfg.data,
        "teacher_id": result.teacher_id,
        "teacher": _side(teacher, count_params(result.teacher) if result.teacher is not None else None),
        "student": _side(student, count_params(result.model)),
        "student_preset": cfg.preset,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "best_val_rsum": result.best_val_rsum,
        "kept_mean_R@1": student["mean_R@1"] / teacher["mean_R@1"] if teacher["mean_R@1"] else None,
        "skipped_data": {**result.skipped_data, cfg.test_split: test.skipped()},
    }
    held = getattr(test.dataset, "held_out", None)
    if held is not None:  # demo-scenes: recall on colour-shape pairs never seen in training
        mask = np.asarray(held, dtype=bool)[images]
        for name, (img, txt) in (("teacher", (t_img, t_txt)), ("student", (s_img, s_txt))):
            report[name]["unseen_pairs_mean_R@1"] = subset_metrics(img, txt, targets, mask)["mean_R@1"]
    atomic_write_json(Path(result.out_dir) / "eval.json", report)
    return report


def evaluate_model(model_spec: str, data: str, split: str, batch_size: int = 256) -> dict:
    """Retrieval metrics (+ zero-shot accuracy with class labels) of a teacher spec or student folder."""
    from edge_msd.data import open_dataset
    from edge_msd.students import load_open_clip_student

    dataset = open_dataset(data, split)
    path = Path(model_spec)
    if (
        (path / "open_clip_config.json").is_file()
        and (path / "manifest.json").is_file()
        and _is_student(path)
    ):
        st = load_open_clip_student(path)
        to_uint8, mean, std = split_preprocess(st.preprocess)
        images = decode_images(dataset, np.arange(dataset.n_images), to_uint8)
        tokens = st.tokenizer(list(dataset.captions)).long()
        img, txt = encode_split(st.model, images, tokens, mean, std, torch.device("cpu"), batch_size)

        def encode_texts(texts: list[str]) -> np.ndarray:
            return encode_split(
                st.model, images[:0], st.tokenizer(texts).long(), mean, std, torch.device("cpu")
            )[1]

        kind, params = f"student ({st.preset})", count_params(st.model)
    else:
        from edge_msd.teachers import load_teacher
        from edge_msd.teachers.encode import embed_dataset, embed_texts

        teacher = load_teacher(model_spec)
        img, txt = embed_dataset(teacher, dataset, batch_size)

        def encode_texts(texts: list[str]) -> np.ndarray:
            return embed_texts(teacher, texts, batch_size)

        kind, params = "teacher", count_params(teacher)
    out = {
        "model": model_spec,
        "kind": kind,
        "params": params,
        "data": data,
        "split": split,
        **retrieval_metrics(img, txt, dataset.caption_image_index),
    }
    if dataset.labels is not None and dataset.class_names:
        prompts = [f"a photo of a {c}" for c in dataset.class_names]
        out["zero_shot_top1"] = zero_shot_accuracy(img, encode_texts(prompts), dataset.labels)
    return out


def _is_student(path: Path) -> bool:
    from edge_msd.artifacts import read_manifest
    from edge_msd.lineage import STUDENT_KIND

    return read_manifest(path).get("kind") == STUDENT_KIND


def print_eval(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['kind']} {result['model']} on {result['data']} [{result['split']}] "
        f"({result['n_images']} images, {result['n_texts']} captions)"
    )
    for col in ("direction", "R@1", "R@5", "R@10"):
        table.add_column(col, justify="right")
    for d in ("i2t", "t2i"):
        table.add_row(d, *(f"{result[d][f'R@{k}']:.1f}" for k in (1, 5, 10)))
    Console().print(table)
    line = f"R-sum {result['rsum']:.1f}, mean R@1 {result['mean_R@1']:.1f}, params {result['params']}"
    if "zero_shot_top1" in result:
        line += f", zero-shot top-1 {result['zero_shot_top1']:.1f}%"
    Console().print(line)
