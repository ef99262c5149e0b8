"""Config of `edge-msd teacher fit` (torch-free, so that the CLI's --help stays fast)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_msd.config import field
from edge_msd.errors import ConfigError

KIND = "edge-msd-demo-teacher"  # the demo teacher folder's manifest kind (read without loading torch)


@dataclass
class DemoTeacherConfig:
    dataset: str = field("demo-scenes", help="dataset spec: heads train on its train split, eval on test")
    out: str | None = field(
        None, help="output folder (default: the demo teacher folder, $EDGE_MSD_HOME/teachers/demo)"
    )
    image_size: int = field(96, help="image tower input size in pixels")
    embed_dim: int = field(256, help="joint embedding size")
    proj: str = field("mlp", help="projection heads: linear or mlp")
    text_unlocked_layers: int = field(
        0,
        help="top MiniLM layers trained with the heads (0 = all locked; each adds minutes per epoch on CPU)",
    )
    context_length: int = field(32, help="text tokens per caption (demo captions need <= 30)")
    epochs: int = field(20, help="passes over the train images")
    batch_size: int = field(256, help="image-caption pairs per step (one caption per image per epoch)")
    lr: float = field(2e-3, help="peak learning rate (AdamW, cosine decay)")
    weight_decay: float = field(0.05, help="AdamW weight decay")
    seed: int = field(0, help="seed for head init and batch order")
    probe_images: int = field(500, help="test images used for the attribute probe")
    device: str = field("cpu", help="torch device")
    features: str | None = field(
        None,
        help="also write the feature caches of the train and test splits, which the fit runs the teacher "
        "over anyway, into this root (one folder per split, as `edge-msd features --teacher demo` "
        "writes them); empty: none",
    )

    def validate(self) -> None:
        if self.proj not in ("linear", "mlp"):
            raise ConfigError(f"teacher fit: field 'proj': expected linear or mlp, got {self.proj!r}")
        if not 0 <= self.text_unlocked_layers <= 6:
            raise ConfigError(
                f"teacher fit: field 'text_unlocked_layers': expected 0..6 (MiniLM has 6 layers), "
                f"got {self.text_unlocked_layers}"
            )
        for name in ("image_size", "embed_dim", "context_length", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"teacher fit: field '{name}': expected a positive integer")
