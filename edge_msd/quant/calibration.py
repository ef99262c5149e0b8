"""Calibration sets: which training samples set the int8 ranges, written down so a run can be redone.

A calibration set is a small JSON manifest (``calibration/<name>.json``): the dataset spec, split and
fingerprint it was drawn from, how it was drawn (stratified, seed), the image ids and keys, one
caption id per image, and the sha256 of that sample list. PTQ calibrates on it, QAT starts its
observers on it, and every quantized artifact copies it into its manifest.

Stratification: with class labels, each class gets its share of the ``n`` samples (largest
remainder); without labels the split's index range is cut into ``n`` equal bins and one image is
drawn from each, so a calibration set covers the whole split (all shards, all generation seeds)
instead of its first rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd.artifacts import atomic_write_json, producer_info, read_json, sha256_bytes
from edge_msd.data.base import ImageTextDataset
from edge_msd.errors import ArtifactError, ConfigError, DataError
from edge_msd.quant.config import MIN_SAMPLES

KIND = "edge-msd-calibration"
SCHEMA_VERSION = 1


@dataclass
class CalibrationSet:
    """Which samples calibrate the quantizers (see module docstring)."""

    name: str
    dataset: str  # the spec it was drawn from
    split: str
    dataset_fingerprint: str
    n: int
    seed: int
    strategy: str  # "per-class" or "index-bins"
    image_ids: list[int]
    image_keys: list[str]
    caption_ids: list[int]
    sha256: str  # of the sample list (ids, keys, caption ids), see ``sample_list_sha256``

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, **asdict(self)}


def sample_list_sha256(image_ids: list[int], image_keys: list[str], caption_ids: list[int]) -> str:
    payload = json.dumps(
        {"image_ids": image_ids, "image_keys": image_keys, "caption_ids": caption_ids},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return sha256_bytes(payload.encode("utf-8"))


def _stratified_ids(dataset: ImageTextDataset, n: int, rng: random.Random) -> tuple[list[int], str]:
    labels = dataset.labels
    if labels is not None and len(labels) == dataset.n_images:
        classes, counts = np.unique(np.asarray(labels), return_counts=True)
        share = counts / counts.sum() * n
        take = np.floor(share).astype(int)
        for i in np.argsort(-(share - take), kind="stable")[: n - int(take.sum())]:
            take[i] += 1
        ids: list[int] = []
        for c, k in zip(classes, take, strict=True):
            members = np.flatnonzero(np.asarray(labels) == c).tolist()
            ids += rng.sample(members, min(int(k), len(members)))
        return sorted(ids), "per-class"
    edges = np.linspace(0, dataset.n_images, n + 1).astype(int)
    return [rng.randrange(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)], "index-bins"


def build_calibration_set(
    dataset: ImageTextDataset, n: int, seed: int = 0, name: str | None = None, min_samples: int = MIN_SAMPLES
) -> CalibrationSet:
    """Draw ``n`` images (and one caption of each) from ``dataset``, stratified, reproducible by seed."""
    if n < min_samples:
        raise ConfigError(f"calibration: n={n} is too small; at least {min_samples} samples are needed")
    if dataset.n_images < n:
        raise DataError(
            f"calibration: {dataset.spec!r} split {dataset.split!r} has {dataset.n_images} "
            f"images, fewer than the {n} asked for"
        )
    rng = random.Random(seed)
    image_ids, strategy = _stratified_ids(dataset, n, rng)
    caption_ids = []
    for i in image_ids:
        caps = dataset.captions_of(i)
        if len(caps) == 0:
            raise DataError(
                f"calibration: image {dataset.image_keys[i]!r} of {dataset.spec!r} has no caption"
            )
        caption_ids.append(int(caps[rng.randrange(len(caps))]))
    keys = [dataset.image_keys[i] for i in image_ids]
    return CalibrationSet(
        name=name or f"{dataset.spec.split(':', 1)[0].split('?', 1)[0]}-{dataset.split}-{n}-s{seed}",
        dataset=dataset.spec,
        split=dataset.split,
        dataset_fingerprint=dataset.fingerprint(),
        n=len(image_ids),
        seed=seed,
        strategy=strategy,
        image_ids=[int(i) for i in image_ids],
        image_keys=keys,
        caption_ids=caption_ids,
        sha256=sample_list_sha256([int(i) for i in image_ids], keys, caption_ids),
    )


def save_calibration_set(cs: CalibrationSet, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, {**cs.to_manifest(), "producer": producer_info()})
    return path


def load_calibration_set(path: str | Path) -> CalibrationSet:
    """Read a calibration manifest; a wrong kind, missing field or edited sample list is an error."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: calibration set not found (build one with `edge-msd calibrate`)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise ArtifactError(
            f"{path}: kind is {data.get('kind') if isinstance(data, dict) else None!r}, expected {KIND!r}"
        )
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    fields = CalibrationSet.__dataclass_fields__
    missing = [f for f in fields if f not in data]
    if missing:
        raise ArtifactError(f"{path}: missing field(s) {', '.join(missing)}")
    cs = CalibrationSet(**{f: data[f] for f in fields})
    if not len(cs.image_ids) == len(cs.image_keys) == len(cs.caption_ids) == cs.n:
        raise ArtifactError(
            f"{path}: field 'n' is {cs.n} but the sample lists have "
            f"{len(cs.image_ids)}/{len(cs.image_keys)}/{len(cs.caption_ids)} entries"
        )
    actual = sample_list_sha256(cs.image_ids, cs.image_keys, cs.caption_ids)
    if actual != cs.sha256:
        raise ArtifactError(
            f"{path}: field 'sha256' does not match the sample list (edited by hand?); "
            "rebuild it with `edge-msd calibrate`"
        )
    return cs


def check_calibration_set(
    cs: CalibrationSet, dataset: ImageTextDataset, min_samples: int = MIN_SAMPLES
) -> None:
    """Refuse a calibration set that is too small or was drawn from other data than ``dataset``."""
    if cs.n < min_samples:
        raise ConfigError(f"calibration set {cs.name!r}: {cs.n} samples, at least {min_samples} are needed")
    if cs.split != dataset.split:
        raise DataError(
            f"calibration set {cs.name!r} was drawn from split {cs.split!r}, "
            f"not {dataset.split!r} of {dataset.spec!r}"
        )
    fp = dataset.fingerprint()
    if cs.dataset_fingerprint != fp:
        raise DataError(
            f"calibration set {cs.name!r} comes from another dataset: fingerprint "
            f"{cs.dataset_fingerprint[:12]}… ({cs.dataset!r}) vs {fp[:12]}… ({dataset.spec!r})"
        )
    bad = [i for i in cs.image_ids if not 0 <= i < dataset.n_images]
    bad_caps = [j for j in cs.caption_ids if not 0 <= j < dataset.n_captions]
    if bad or bad_caps:
        raise DataError(
            f"calibration set {cs.name!r}: ids outside {dataset.spec!r} ({bad[:3] or bad_caps[:3]})"
        )


def calibration_batches(
    cs: CalibrationSet,
    dataset: ImageTextDataset,
    image_transform: Any,
    tokenizer: Any,
    batch_size: int,
    limit: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """(images float (B,3,H,W), tokens int32 (B,L)) batches over the set, in its stored order."""
    import torch

    ids = cs.image_ids[:limit] if limit else cs.image_ids
    caps = cs.caption_ids[: len(ids)]
    for s in range(0, len(ids), batch_size):
        images = torch.stack([image_transform(dataset.load_image(i)) for i in ids[s : s + batch_size]])
        tokens = tokenizer([dataset.captions[j] for j in caps[s : s + batch_size]]).to(torch.int32)
        yield images, tokens
