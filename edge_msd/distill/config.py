"""Config of ``edge-msd distill`` (free of torch, so that the CLI's ``--help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edge_msd import paths
from edge_msd.config import field
from edge_msd.errors import ConfigError
from edge_msd.lineage import DEMO_DATA, fill_from_record, read_student_record
from edge_msd.teachers.features_config import feature_split_dir

# Kept in step with edge_msd.distill.losses.LOSS_NAMES (checked by a test) without importing torch.
KNOWN_LOSSES = ("contrastive", "feature", "similarity", "hard_negative", "clip", "affinity")
DSMD_LOSSES = ["contrastive", "feature", "similarity", "hard_negative"]
# Default: DSMD's relational losses plus teacher-affinity mimicking (the teacher's image-text similarity
# structure). The point-wise feature and cosine losses pin each student point to its teacher point and
# cost recall in five of six paired runs (docs/results.md, Ablations); `--losses` turns them back on.
DEFAULT_LOSSES = ["contrastive", "hard_negative", "affinity"]
KNOWN_BALANCERS = ("dynamic", "fixed", "uncertainty")


@dataclass
class DistillConfig:
    """``edge-msd distill``: train a student on cached teacher embeddings (DSMD)."""

    teacher: str | None = field(
        "demo",
        help="teacher spec: checks the feature caches and builds missing ones; "
        "empty: the train cache's teacher",
    )
    data: str = field("demo-scenes", help="dataset spec")
    features: str = field(str(paths.FEATURES), help="feature-cache root: one cache folder per split in it")
    train_split: str = field("train", help="split to train on")
    val_split: str | None = field("val", help="split for validation R-sum (best checkpoint); empty: none")
    test_split: str | None = field("test", help="held-out split for the final eval.json; empty: none")
    out: str = field(str(paths.DISTILL), help="output folder (student/, eval.json, metrics, checkpoints)")
    preset: str = field(
        "edge-s",
        help="student spec: a preset (see `edge-msd students`), open_clip:ARCH[@TAG|@/path/weights], "
        "local-dir:/path/open_clip_folder or config:/path/model_config.json",
        aliases=("--student",),
    )
    image_size: int | None = field(
        None,
        help="student image size [default: its config's]; native ViTs take multiples of the patch size, "
        "timm and ResNet towers what their strides and pooling allow",
    )
    embed_dim: int | None = field(
        None,
        help="student embedding dim [default: the teacher's; else a "
        "training-only linear adaptor bridges the two]",
    )
    init: str | None = field(None, help="start from this saved student folder instead of random weights")
    losses: list[str] = field(
        DEFAULT_LOSSES, help=f"losses, comma-separated; known: {', '.join(KNOWN_LOSSES)}"
    )
    temperature: float = field(0.07, help="temperature of contrastive distillation")
    margin: float = field(0.2, help="margin of hard-negative distillation")
    balancer: str = field("dynamic", help=f"loss balancer: {', '.join(KNOWN_BALANCERS)}")
    balancer_temperature: float = field(1.0, help="softmax temperature of the dynamic balancer's rate term")
    queue_size: int = field(
        4096, help="teacher-embedding queue length (negatives of contrastive distillation)"
    )
    steps: int = field(900, help="optimizer steps (900: about 5 min of the demo, edge-s, on 2 CPU cores)")
    batch_size: int = field(128, help="images per optimizer step, over all ranks and accumulation steps")
    captions_per_image: int = field(1, help="captions drawn per image per step")
    accum_steps: int = field(1, help="gradient accumulation: micro-batches per optimizer step")
    lr: float = field(3e-3, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.05, help="AdamW weight decay (not on norms, biases, embeddings)")
    warmup_steps: int = field(20, help="linear warm-up steps, then cosine decay")
    min_lr_ratio: float = field(0.02, help="final learning rate as a fraction of the peak")
    grad_clip: float = field(1.0, help="max gradient norm (0: off)")
    augment: bool = field(
        False,
        help="light augmentation: random zoom-in crop (no flips, no colour jitter); off by default: "
        "the crop changes size and position, which the demo's captions name (it cost ~3 points kept)",
    )
    ema_decay: float = field(
        0.99,
        help="EMA of the student's weights with this decay (warmed up); the EMA model is validated "
        "and saved; 0: off (the raw weights)",
    )
    eval_every: int = field(50, help="validate every N steps (and at the end)")
    ckpt_every: int = field(50, help="checkpoint every N steps (and at the end)")
    max_bad_steps: int = field(20, help="stop with an error after this many non-finite steps in a row")
    seed: int = field(0, help="seed of initialisation, data order and augmentation")
    device: str = field("auto", help="auto, cpu, cuda, cuda:N")
    bf16: bool = field(True, help="bf16 autocast on CUDA (ignored on CPU)")
    num_workers: int = field(0, help="DataLoader workers that decode images (0: in the main process)")
    predecode_mb: int = field(
        4096,
        help="decode all training images once into memory if they fit in this many MB; else decode per batch",
    )
    verify_cache: bool = field(
        False,
        help="re-hash every feature cache file before training (reads the whole cache); without it a "
        "cache is checked by its records (shard sizes, headers, recorded hashes)",
    )
    resume: bool = field(False, help="continue from out/checkpoints/last.pt exactly where it stopped")
    force: bool = field(False, help="start afresh even if out/ holds another run")

    def validate(self) -> None:
        unknown = [n for n in self.losses if n not in KNOWN_LOSSES]
        if unknown:
            raise ConfigError(
                f"field 'losses': unknown loss(es) {', '.join(unknown)}; known: {', '.join(KNOWN_LOSSES)}"
            )
        if not self.losses:
            raise ConfigError(f"field 'losses': empty; choose from {', '.join(KNOWN_LOSSES)}")
        if self.balancer not in KNOWN_BALANCERS:
            raise ConfigError(
                f"field 'balancer': unknown {self.balancer!r}; known: {', '.join(KNOWN_BALANCERS)}"
            )
        for name in (
            "steps",
            "batch_size",
            "captions_per_image",
            "accum_steps",
            "queue_size",
            "eval_every",
            "ckpt_every",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"field '{name}': expected a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "predecode_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"field '{name}': expected >= 0, got {getattr(self, name)}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"field 'batch_size': {self.batch_size} is not divisible by accum_steps={self.accum_steps}"
            )
        if not (
            self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip >= 0 and self.weight_decay >= 0
        ):
            raise ConfigError(
                "fields 'lr' > 0, 0 <= 'min_lr_ratio' <= 1, 'grad_clip' >= 0 and "
                "'weight_decay' >= 0 are required"
            )
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"field 'ema_decay': expected 0 (off) or in (0, 1), got {self.ema_decay}")
        if self.image_size is not None and self.image_size < 16:
            raise ConfigError(f"field 'image_size': expected an integer >= 16, got {self.image_size}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(f"field 'embed_dim': expected a positive integer, got {self.embed_dim}")

    def feature_dir(self, split: str) -> Path:
        return feature_split_dir(self.features, split, "--features")

    def out_dir(self) -> Path:
        return Path(self.out)


@dataclass
class EvalConfig:
    """``edge-msd eval``: retrieval recall of a teacher or a saved student on one split."""

    model: str | None = field(None, help="teacher spec (e.g. demo) or a student folder (required)")
    data: str | None = field(
        None, help="dataset spec [default: a student's recorded data; demo-scenes for the demo teacher]"
    )
    split: str | None = field(None, help="dataset split [default: a student's test split, else test]")
    json: str | None = field(None, help="also write the metrics to this JSON file")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("field 'model': required; a teacher spec (e.g. demo) or a student folder")

    def resolved(self) -> EvalConfig:
        """Unset data and split from the student folder's record (a teacher records no data: only the
        demo teacher has a default, the demo's data)."""
        if Path(str(self.model)).is_dir():
            return fill_from_record(self, read_student_record(str(self.model)))
        if self.data or self.model == "demo":
            return replace(self, data=self.data or DEMO_DATA, split=self.split or "test")
        raise ConfigError(f"field 'data': required to evaluate teacher {self.model!r}; pass --data SPEC")
