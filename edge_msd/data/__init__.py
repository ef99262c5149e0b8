"""Image-caption datasets selected by a spec string: ``KIND[:PATH][?key=value&...]``.

Kinds: ``demo-scenes`` (generated, no download), ``fashion-mnist`` (Debian package
dataset-fashion-mnist), ``csv:FILE.csv|.tsv`` (open_clip convention), ``coco:dataset_coco.json`` and
``flickr30k:dataset_flickr30k.json`` (Karpathy splits), ``wds:SHARDS.tar`` (webdataset shards, brace
patterns allowed). Every kind returns an ``ImageTextDataset`` (see ``base.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from edge_msd.data.base import ImageTextDataset
from edge_msd.data.spec import Spec, parse_spec
from edge_msd.errors import ConfigError


def _demo_scenes(spec: Spec, split: str, skip_bad: bool) -> ImageTextDataset:
    from edge_msd.data.scenes import open_demo_scenes

    return open_demo_scenes(spec, split)


def _fashion_mnist(spec: Spec, split: str, skip_bad: bool) -> ImageTextDataset:
    from edge_msd.data.fashion import open_fashion_mnist

    return open_fashion_mnist(spec, split)


def _csv(spec: Spec, split: str, skip_bad: bool) -> ImageTextDataset:
    from edge_msd.data.csv_data import open_csv

    return open_csv(spec, split, skip_bad)


def _karpathy(spec: Spec, split: str, skip_bad: bool) -> ImageTextDataset:
    from edge_msd.data.karpathy import open_karpathy

    return open_karpathy(spec, split, skip_bad)


def _wds(spec: Spec, split: str, skip_bad: bool) -> ImageTextDataset:
    from edge_msd.data.wds import open_wds

    return open_wds(spec, split, skip_bad)


KINDS: dict[str, Callable[[Spec, str, bool], ImageTextDataset]] = {
    "demo-scenes": _demo_scenes,
    "fashion-mnist": _fashion_mnist,
    "csv": _csv,
    "coco": _karpathy,
    "flickr30k": _karpathy,
    "wds": _wds,
}


def open_dataset(spec: str, split: str = "train", *, skip_bad: bool = False) -> ImageTextDataset:
    """Open one split of the dataset ``spec`` names.

    Problems in the data raise ``DataError`` naming the file and line/field; with ``skip_bad``
    samples that are found bad while opening are dropped and listed in ``dataset.skipped``
    (images found bad later raise ``BadSampleError`` from ``load_image``).
    """
    parsed = parse_spec(spec)
    opener = KINDS.get(parsed.kind)
    if opener is None:
        raise ConfigError(
            f"dataset spec {spec!r}: unknown kind {parsed.kind!r}; known kinds: {', '.join(KINDS)}"
        )
    return opener(parsed, split, skip_bad)


__all__ = ["KINDS", "ImageTextDataset", "open_dataset", "parse_spec"]
