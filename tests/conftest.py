"""Shared test settings: keep torch to one thread (CI has 2 cores) and runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the bench tests run without torch
    pass


def pytest_report_header(config):
    import edge_msd

    return f"edge_msd imported from {edge_msd.__file__}"  # CI: the installed package, not the checkout
