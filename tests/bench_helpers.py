"""The clean environment the benchmark binary runs in: no torch, no editable install."""

from __future__ import annotations

import os
from pathlib import Path


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """Run with ``python -S``: no site processing, so the editable edge_msd install is invisible and the
    package comes from the .pyz only; site-packages is on the path for numpy and the runtime, behind a
    ``torch`` that raises on import: the binary must not need it."""
    import site

    poison = tmp_path / "poison"
    poison.mkdir(exist_ok=True)
    (poison / "torch.py").write_text("raise ImportError('the benchmark binary must not import torch')\n")
    path = os.pathsep.join([str(poison), *site.getsitepackages()])
    return {"PATH": os.environ["PATH"], "PYTHONPATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
