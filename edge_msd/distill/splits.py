"""One split ready for training or evaluation: its feature cache (built when missing), data, tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edge_msd.distill.config import DistillConfig
from edge_msd.distill.images import ImageStore, console
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.torchrun import broadcast_from_rank0, rank_world


@dataclass
class SplitData:
    """A split ready for training or evaluation: cache, images, tokens."""

    cache: Any
    dataset: Any
    images: ImageStore
    tokens: Tensor  # (n_captions, context_length) int64

    def skipped(self) -> dict[str, int]:
        """What this split leaves out: images the cache marked bad, samples the reader dropped."""
        return {
            "bad_images": int((~self.cache.valid_images).sum()),
            "dropped_when_read": len(self.dataset.skipped),
        }

    def usable(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(usable image ids, the ids of their captions, each caption's image as a position in the first)."""
        valid = np.flatnonzero(self.cache.valid_images)
        cap_img = self.cache.caption_image_index
        caps = np.flatnonzero(np.isin(cap_img, valid))
        position = np.full(len(self.cache.valid_images), -1, dtype=np.int64)
        position[valid] = np.arange(len(valid))
        return valid, caps, position[cap_img[caps]]


def open_split(
    cfg: DistillConfig,
    split: str,
    teacher: Any,
    teacher_id: str,
    to_uint8: Callable,
    size: int,
    tokenizer: Callable,
    desc: str = "",
) -> SplitData:
    """Open ``split``'s feature cache (built by ``teacher`` when missing) and the dataset it was made from.

    A cache of another teacher or of other data is refused (ArtifactError naming both). A cache built
    with ``skip_bad`` opens its dataset with ``skip_bad``, and the images it marked bad are never read.
    Under torchrun every rank builds its share of a missing cache.
    """
    from edge_msd.data import open_dataset
    from edge_msd.teachers.cache import FeatureCache, build_feature_cache, built_skipping_bad

    path = cfg.feature_dir(split)
    built = broadcast_from_rank0((path / "manifest.json").is_file())  # all ranks must take the same road
    dataset = open_dataset(cfg.data, split, skip_bad=built and built_skipping_bad(path))
    if not built:
        if teacher is None:
            raise ArtifactError(f"no feature cache at {path} and no teacher configured to build it")
        if rank_world()[0] == 0:
            console.print(f"[bold]feature cache {path} missing: teacher {cfg.teacher!r} builds it ({split})")
        build_feature_cache(teacher, dataset, path)
    cache = FeatureCache.open(path, teacher_id=teacher_id, dataset_fingerprint=dataset.fingerprint(),
                              verify=cfg.verify_cache)
    if cache.n_images != dataset.n_images or cache.n_captions != dataset.n_captions:
        raise ArtifactError(
            f"feature cache {path} has {cache.n_images} images / {cache.n_captions} captions, "
            f"dataset {cfg.data}:{split} has {dataset.n_images} / {dataset.n_captions}"
        )
    images = ImageStore(
        dataset, cache.valid_images, to_uint8, size, cfg.predecode_mb, cfg.num_workers, f"decoding {split}"
    )
    tokens = tokenizer(list(dataset.captions)).long()
    return SplitData(cache, dataset, images, tokens)


def resolve_teacher(cfg: DistillConfig, device: torch.device) -> tuple[Any, str]:
    """(teacher or None, the teacher id every cache must carry).

    With ``cfg.teacher`` set, that teacher is loaded (its id checks the caches; it builds missing ones).
    Without, the train cache's own teacher id is used, so every other split must come from it.
    """
    from edge_msd.teachers import load_teacher
    from edge_msd.teachers.cache import FeatureCache

    if cfg.teacher:
        teacher = load_teacher(cfg.teacher, device=str(device))
        return teacher, teacher.id
    path = cfg.feature_dir(cfg.train_split)
    if not (path / "manifest.json").is_file():
        raise ConfigError(f"no teacher configured and no feature cache at {path}: set --teacher")
    return None, FeatureCache.open(path, verify=False).teacher_id
