"""Tiny open_clip students and a tiny real-image dataset for the export, bundle and tokenizer tests."""

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
