"""Retrieval metrics (numpy only): shared by the trainer and the on-device benchmark."""

from edge_msd.eval.retrieval import retrieval_metrics, zero_shot_accuracy

__all__ = ["retrieval_metrics", "zero_shot_accuracy"]
