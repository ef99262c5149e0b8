"""Calibration sets: which training samples set the int8 ranges, written down so a run can be redone.

A calibration set is a small JSON manifest (``calibration/<name>.json``): the dataset spec, split and
fingerprint it was drawn from, how it was drawn (stratified, seed), the image ids and keys, one
caption id per image, and the sha256 of that sample list. PTQ calibrates on it, QAT starts its
observers on it, and every quantized artifact copies it into its manifest.

Stratification: with class labels, each class gets its share of the ``n`` samples (largest
remainder); without labels the split's index range is cut into ``n`` equal bins and one image is
drawn from each, so a calibration set covers the whole split (all shards, all generation seeds)
instead of its first rows.

Bad images are never drawn: a drawn image that the split's feature cache marked bad (``features
--skip-bad``) or, without such a cache, that does not decode, is replaced by another of its class or
bin and listed in ``skipped_images``. Datasets are opened with ``skip_bad`` here (a split with no bad
rows opens the same either way), and the rows its reader dropped are counted in ``dropped_when_read``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
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
    skipped_images: list[dict] = field(default_factory=list)  # drawn, found bad, replaced
    dropped_when_read: int = 0  # samples the dataset reader dropped as bad (skip_bad)

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": KIND, "schema_version": SCHEMA_VERSION, **asdict(self)}


def sample_list_sha256(image_ids: list[int], image_keys: list[str], caption_ids: list[int]) -> str:
    payload = json.dumps(
        {"image_ids": image_ids, "image_keys": image_keys, "caption_ids": caption_ids},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return sha256_bytes(payload.encode("utf-8"))


def _stratified_ids(
    dataset: ImageTextDataset, n: int, rng: random.Random
) -> tuple[list[tuple[int, Collection[int]]], str]:
    """(drawn image id, the stratum it was drawn from) pairs and the strategy's name."""
    labels = dataset.labels
    if labels is not None and len(labels) == dataset.n_images:
        classes, counts = np.unique(np.asarray(labels), return_counts=True)
        share = counts / counts.sum() * n
        take = np.floor(share).astype(int)
        for i in np.argsort(-(share - take), kind="stable")[: n - int(take.sum())]:
            take[i] += 1
        drawn: list[tuple[int, Collection[int]]] = []
        for c, k in zip(classes, take, strict=True):
            members = np.flatnonzero(np.asarray(labels) == c).tolist()
            drawn += [(i, members) for i in rng.sample(members, min(int(k), len(members)))]
        return drawn, "per-class"
    edges = np.linspace(0, dataset.n_images, n + 1).astype(int)
    bins = [range(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [(rng.randrange(b.start, b.stop), b) for b in bins], "index-bins"


def _usable_check(
    dataset: ImageTextDataset, bad_images: Collection[int] | None, skipped: list[dict]
) -> Callable[[int], bool]:
    """A test ``usable(i)`` that records each bad image it meets in ``skipped`` (once)."""
    known_bad: set[int] = set()

    def usable(i: int) -> bool:
        if i in known_bad:
            return False
        reason = None
        if bad_images is not None:  # the feature cache already decoded every image
            reason = "marked bad by the feature cache" if i in bad_images else None
        else:
            try:
                dataset.load_image(i)
            except DataError as e:
                reason = str(e)
        if reason is None:
            return True
        known_bad.add(i)
        skipped.append({"image_index": i, "key": dataset.image_keys[i], "reason": reason})
        return False

    return usable


def _replace_bad(
    drawn: list[tuple[int, Collection[int]]], usable: Callable[[int], bool], rng: random.Random
) -> list[int]:
    """The drawn ids, each bad one replaced by a random usable image of its stratum (dropped if none)."""
    taken = {i for i, _ in drawn}
    ids = []
    for i, stratum in drawn:
        ok = usable(i)
        candidates = [] if ok else [m for m in stratum if m not in taken]
        while not ok and candidates:
            i = candidates.pop(rng.randrange(len(candidates)))
            taken.add(i)
            ok = usable(i)
        if ok:
            ids.append(i)
    return ids


def build_calibration_set(
    dataset: ImageTextDataset,
    n: int,
    seed: int = 0,
    name: str | None = None,
    min_samples: int = MIN_SAMPLES,
    bad_images: Collection[int] | None = None,
) -> CalibrationSet:
    """Draw ``n`` images (and one caption of each) from ``dataset``, stratified, reproducible by seed.

    ``bad_images``: the ids the split's feature cache marked bad (:func:`cache_bad_images`); without
    it every drawn image is decoded once to find the bad ones. Bad draws are replaced (module docstring).
    """
    if n < min_samples:
        raise ConfigError(f"calibration: n={n} is too small; at least {min_samples} samples are needed")
    if dataset.n_images < n:
        raise DataError(
            f"calibration: {dataset.spec!r} split {dataset.split!r} has {dataset.n_images} "
            f"images, fewer than the {n} asked for"
        )
    rng = random.Random(seed)
    drawn, strategy = _stratified_ids(dataset, n, rng)
    skipped: list[dict] = []
    image_ids = _replace_bad(drawn, _usable_check(dataset, bad_images, skipped), rng)
    if strategy == "per-class":
        image_ids.sort()
    if len(image_ids) < min_samples:
        raise DataError(
            f"calibration: only {len(image_ids)} usable images in {dataset.spec!r} split {dataset.split!r} "
            f"({len(skipped)} bad); at least {min_samples} are needed"
        )
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
        skipped_images=sorted(skipped, key=lambda s: s["image_index"]),
        dropped_when_read=len(dataset.skipped),
    )


def cache_bad_images(cache_dir: str | Path, dataset: ImageTextDataset) -> set[int] | None:
    """The image ids the feature cache at ``cache_dir`` marked bad, if it is a complete cache of
    ``dataset`` (same fingerprint); None otherwise (then the draw decodes its images to find bad ones)."""
    from edge_msd.teachers.cache import FeatureCache

    if not (Path(cache_dir) / "manifest.json").is_file():
        return None
    try:
        cache = FeatureCache.open(cache_dir, dataset_fingerprint=dataset.fingerprint(), verify=False)
    except ArtifactError:  # a cache of other data: it says nothing about these images
        return None
    return set(np.flatnonzero(~cache.valid_images).tolist())


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
    optional = {"skipped_images", "dropped_when_read"}  # absent from manifests written before them
    missing = [f for f in fields if f not in data and f not in optional]
    if missing:
        raise ArtifactError(f"{path}: missing field(s) {', '.join(missing)}")
    cs = CalibrationSet(**{f: data[f] for f in fields if f in data})
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
    skipped: list[dict] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """(images float (B,3,H,W), tokens int32 (B,L)) batches over the set, in its stored order.

    An image that no longer decodes is left out with its caption and recorded in ``skipped``.
    """
    import torch

    ids = cs.image_ids[:limit] if limit else cs.image_ids
    pairs = list(zip(ids, cs.caption_ids[: len(ids)], strict=True))
    for s in range(0, len(pairs), batch_size):
        images, captions = [], []
        for i, j in pairs[s : s + batch_size]:
            try:
                images.append(image_transform(dataset.load_image(i)))
            except DataError as e:
                if skipped is not None:
                    skipped.append({"image_index": i, "key": dataset.image_keys[i], "reason": str(e)})
                continue
            captions.append(dataset.captions[j])
        if images:
            yield torch.stack(images), tokenizer(captions).to(torch.int32)
