"""Image decoding in DataLoader workers started by spawn (macOS's default start method, Linux's from
Python 3.14): every piece the workers receive must pickle."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np, torch
from open_clip.transform import image_transform
from edge_msd.data import open_dataset
from edge_msd.distill.images import decode_images, split_preprocess

torch.multiprocessing.set_start_method("spawn", force=True)
ds = open_dataset("demo-scenes?n_train=8&n_val=0&n_test=0&size=32", "train")
to_uint8 = split_preprocess(image_transform(32, is_train=False))[0]
idx = np.arange(8)
in_workers = decode_images(ds, idx, to_uint8, num_workers=2)
in_process = decode_images(ds, idx, to_uint8, num_workers=0)
assert in_workers.shape == (8, 3, 32, 32) and torch.equal(in_workers, in_process)
print("spawn ok")
"""


@pytest.mark.slow
def test_decoding_workers_start_under_spawn(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0 and "spawn ok" in res.stdout, res.stderr[-2000:]
