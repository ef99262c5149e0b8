"""``edge-msd data``: what a dataset spec opens to (counts, example captions, classes, skipped)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_msd.config import field
from edge_msd.data import open_dataset
from edge_msd.data.base import ImageTextDataset
from edge_msd.errors import ConfigError


@dataclass
class DataConfig:
    spec: str = field("demo-scenes", help="dataset spec KIND[:PATH][?key=value&...]")
    split: str = field("train", help="split to open (train, val, test)")
    skip_bad: bool = field(False, help="drop samples found bad while opening and list them")
    examples: int = field(5, help="how many example captions to show")

    def validate(self) -> None:
        if self.examples < 0:
            raise ConfigError(f"field 'examples': expected a non-negative integer, got {self.examples}")


def summarize(ds: ImageTextDataset, examples: int = 5) -> dict:
    """Counts and a few evenly spread example captions (with their image keys)."""
    per_image = np.bincount(ds.caption_image_index, minlength=ds.n_images)
    picks = (
        np.linspace(0, ds.n_captions - 1, num=min(examples, ds.n_captions)).astype(int) if examples else []
    )
    out = {
        "spec": ds.spec,
        "split": ds.split,
        "images": ds.n_images,
        "captions": ds.n_captions,
        "captions_per_image": {
            "mean": float(per_image.mean()) if ds.n_images else 0.0,
            "min": int(per_image.min()) if ds.n_images else 0,
            "max": int(per_image.max()) if ds.n_images else 0,
        },
        "unique_captions": len(set(ds.captions)),
        "examples": [(ds.image_keys[ds.caption_image_index[j]], ds.captions[j]) for j in picks],
        "skipped": len(ds.skipped),
    }
    if ds.class_names is not None and ds.labels is not None:
        counts = np.bincount(ds.labels, minlength=len(ds.class_names))
        out["classes"] = dict(zip(ds.class_names, counts.tolist(), strict=True))
    return out


def print_summary(cfg: DataConfig) -> dict:
    """Open ``cfg.spec`` and print a rich summary; returns the summary dict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    s = summarize(open_dataset(cfg.spec, cfg.split, skip_bad=cfg.skip_bad), cfg.examples)
    console = Console()
    table = Table(title=escape(f"{s['spec']}  [{s['split']}]"), show_header=False)
    table.add_row("images", f"{s['images']:,}")
    cpi = s["captions_per_image"]
    table.add_row("captions", f"{s['captions']:,} ({s['unique_captions']:,} distinct)")
    table.add_row("captions/image", f"{cpi['mean']:.2f} (min {cpi['min']}, max {cpi['max']})")
    if "classes" in s:
        table.add_row("classes", ", ".join(f"{k} ({v})" for k, v in s["classes"].items()))
    if s["skipped"]:
        table.add_row("skipped (bad)", f"[yellow]{s['skipped']}[/yellow]")
    for key, caption in s["examples"]:
        table.add_row(f"[dim]{escape(key)}[/dim]", escape(caption))
    console.print(table)
    return s
