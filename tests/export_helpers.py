"""Tiny open_clip students and a tiny real-image dataset for the export, bundle and tokenizer tests, and the
exports of the family tests (fp32 on the tiny dataset, int8 through the quant stage, the graph checks)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_msd.data.base import ImageTextDataset

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
DATA = "demo-scenes?n_train=48&n_val=16&n_test=16&size=32"  # real drawn scenes at the tiny student's size
CAPTIONS = ["a photo of a cat", "an astronaut in a white suit", "coffee beans on a table",
            "a rocket launch", "grey stones", "a camera man on a tripod", "a clock tower", "brick wall"]


def make_tiny_student(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny open_clip model in the hub layout the students package writes."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from edge_msd.artifacts import write_manifest

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                     "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    write_manifest(folder, "student", preset="tiny")  # students are loaded only with verified hashes
    return folder


@dataclass
class DrawnDataset(ImageTextDataset):
    """Small drawn scenes (a coloured shape on a coloured background), deterministic per index."""

    def load_image(self, index: int) -> Image.Image:
        from PIL import ImageDraw

        rng = np.random.default_rng(index)
        img = Image.new("RGB", (48 + 8 * index, 40), tuple(int(v) for v in rng.integers(0, 255, 3)))
        box = [int(v) for v in sorted(rng.integers(0, 40, 2))] * 2
        ImageDraw.Draw(img).ellipse([box[0], box[1], box[2] + 8, box[3] + 8], fill=(255, 30 * index % 255, 0))
        return img


def tiny_dataset() -> ImageTextDataset:
    caps = CAPTIONS + [c + " again" for c in CAPTIONS[:4]]
    idx = np.array(list(range(8)) + list(range(4)), dtype=np.int64)
    return DrawnDataset(spec="drawn", split="test", image_keys=[f"img{i}" for i in range(8)], captions=caps,
                        caption_image_index=idx)


TABLE = [49408, 32]  # the tiny student's token-embedding table: int8 rows in every int8 bundle
TABLE_FP32_BYTES = 49408 * 32 * 4


def _export(tmp_path, student_dir, target, precision=None, **kw):
    from edge_msd.export.bundle import ExportConfig, export_bundle

    cfg = ExportConfig(target=target, student=str(student_dir), precision=precision,
                       out=str(tmp_path / target), probe_images=8, **kw)
    return export_bundle(cfg, dataset=tiny_dataset())


def _export_int8(tmp_path, student_dir, target, calibration, **kw):
    """int8 without --quantized: the pipeline runs the quant stage's PTQ on a calibration set, then exports.
    The parity probe is the whole tiny test split: on 8 images of this random student (reference R@1 22%)
    one image's rank flipping under int8 noise moves ΔR@1 by 12.5 points with the cosines unchanged."""
    from edge_msd.export.bundle import ExportConfig
    from edge_msd.pipeline import export_target

    cfg = ExportConfig(target=target, student=str(student_dir), precision="int8", out=str(tmp_path / target),
                       data=DATA, probe_images=16, calibration=str(calibration), **kw)
    return export_target(cfg)


def _check(family, target: str, student_dir: Path, folder: Path) -> tuple[dict, list[str]]:
    from edge_msd.families.common.base import ExportRequest
    from edge_msd.students.towers import load_student_towers
    from edge_msd.targets import load_target

    profile = load_target(target)
    request = ExportRequest(load_student_towers(student_dir), profile, profile.precision)
    entries = family.export(request, folder)
    lines: list[str] = []
    return family.check_graph(profile, entries, folder, lines.append), lines
