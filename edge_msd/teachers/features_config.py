"""Config of ``edge-msd features`` (kept free of torch so that the CLI's ``--help`` stays fast)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge_msd import paths
from edge_msd.config import field
from edge_msd.errors import ConfigError


@dataclass
class FeaturesConfig:
    """``edge-msd features``: run a teacher over one dataset split and cache its embeddings."""

    teacher: str = field("demo", help="teacher spec (e.g. demo, or an open_clip / ONNX teacher spec)")
    data: str = field("demo-scenes", help="dataset spec (e.g. demo-scenes, csv:/data/pairs.csv)")
    split: str = field("train", help="dataset split")
    out: str = field(
        str(paths.FEATURES), help="feature-cache root: the cache is written to <out>/<split>/ (what "
        "distill --features and qat --features take)"
    )
    batch_size: int = field(256, help="images/captions per teacher call")
    shard_size: int = field(4096, help="rows per shard file (the unit of resume and of work per rank)")
    num_workers: int = field(0, help="DataLoader worker processes that decode and preprocess images")
    skip_bad: bool = field(False, help="skip unreadable images/captions (counted in the manifest) "
                                       "instead of stopping")
    device: str = field("auto", help="where the teacher runs: auto (this rank's GPU if any, else cpu), "
                                     "cpu, cuda:N")
    force: bool = field(False, help="recompute the cache even if one of another teacher or dataset is there")

    def validate(self) -> None:
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field '{name}': expected a positive integer, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"field 'num_workers': expected >= 0, got {self.num_workers}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"

    def out_dir(self) -> Path:
        return feature_split_dir(self.out, self.split, "--out")


def feature_split_dir(root: str | Path, split: str, option: str) -> Path:
    """``<root>/<split>``: the one layout of feature caches that features, distill and qat agree on.

    A root that is itself one split's cache (it holds the cache's manifest.json or run.json) is the
    common mix-up, so it is refused with the layout that was expected."""
    root = Path(root)
    if (root / "run.json").is_file() or _is_feature_cache(root / "manifest.json"):
        raise ConfigError(
            f"{option} {root}: this folder is one split's feature cache; {option} takes the feature-cache "
            f"root holding one folder per split (<root>/{split}/manifest.json), e.g. {option} {root.parent}"
        )
    return root / split


def _is_feature_cache(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("kind") == "edge-msd-features"
    except (OSError, ValueError, AttributeError):
        return False
