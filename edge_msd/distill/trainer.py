"""The DSMD distillation trainer: cached teacher embeddings → a small open_clip student.

The student sees raw images (decoded once into a uint8 array when they fit in memory, resized by
the student's own preprocess) and tokenized captions; the teacher is present only through its
feature cache. Every batch is a function of (seed, step) alone: step s takes images
``perm_e[o : o + B]`` of epoch e's permutation (sample ids, never cache batch positions), its
captions and augmentation come from a generator seeded by (seed, step). So a resumed run sees
exactly the data an uninterrupted one would, and under ``torchrun`` rank r takes slice r of the
same global batch: the embeddings are gathered back into the global batch (teacher rows and the
queue are identical on every rank, the rank's own student rows keep their gradient), so in-batch
hard negatives and the queue span all ranks and 2 processes compute what 1 process would.
BatchNorm (the mobile-CNN image towers) is the exception: on CUDA it becomes SyncBatchNorm, which
normalises with the global batch; elsewhere each rank normalises with its own rows, as plain DDP
does, and the running statistics are averaged over ranks after every step.

One loop serves distillation and QAT (``edge_msd.quant`` calls ``train`` with hooks).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from edge_msd.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from edge_msd.config import config_to_dict, save_config
from edge_msd.distill.balancer import make_balancer
from edge_msd.distill.config import DistillConfig
from edge_msd.distill.dist import (
    average_batchnorm_stats,
    gather_across_ranks,
    is_distributed,
    sync_batchnorm,
)
from edge_msd.distill.losses import LOSS_NAMES, LossConfig, distill_losses
from edge_msd.distill.queue import TeacherQueue
from edge_msd.errors import ArtifactError, ConfigError, EdgeMSDError
from edge_msd.eval.retrieval import retrieval_metrics
from edge_msd.students import create_student, load_student, preset_config, save_student, student_transform

CKPT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
METRICS, PLOT = "metrics.jsonl", "losses.png"
_console = Console(stderr=True)


class NonFiniteLossError(EdgeMSDError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


@dataclass
class TrainResult:
    """What a finished run left: the trained module (best weights when validated) and where things are."""

    model: nn.Module
    out_dir: Path
    steps: int
    skipped_steps: int
    best_val_rsum: float | None
    val: dict | None = None
    student_dir: Path | None = None
    history: list[dict] = field(default_factory=list)
    teacher: Any = None  # the loaded teacher, when cfg.teacher named one
    teacher_id: str = ""
    preprocess: tuple | None = None  # (PIL -> uint8 HWC, mean, std): what the student saw
    tokenizer: Callable | None = None


# ---- images and captions ------------------------------------------------------------------------


def split_preprocess(preprocess: Callable) -> tuple[Callable, Tensor, Tensor]:
    """(PIL → uint8 HWC array, mean, std) from an open_clip/torchvision Compose preprocess.

    Decoding stops before ToTensor/Normalize so images can be stored as uint8 and normalised in
    torch, batch by batch, after augmentation; what the student sees equals ``preprocess(image)``.
    """
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise ConfigError(
            "the student preprocess must be a torchvision Compose ending in ToTensor, Normalize"
        )
    pil_steps = [t for t in steps if "ToTensor" not in type(t).__name__ and type(t).__name__ != "Normalize"]
    norm = [t for t in steps if type(t).__name__ == "Normalize"]
    mean = torch.tensor(norm[0].mean if norm else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
    std = torch.tensor(norm[0].std if norm else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)

    def to_uint8(image: Any) -> np.ndarray:
        for t in pil_steps:
            image = t(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    return to_uint8, mean, std


class _DecodeSet(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, indices: np.ndarray, to_uint8: Callable):
        self.dataset, self.indices, self.to_uint8 = dataset, indices, to_uint8

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.to_uint8(self.dataset.load_image(int(self.indices[i])))


class ImageStore:
    """uint8 (N, 3, H, W) images by index: all decoded up front, or decoded on demand."""

    def __init__(
        self, dataset: Any, to_uint8: Callable, size: int, predecode_mb: int, num_workers: int, desc: str
    ):
        self.dataset, self.to_uint8 = dataset, to_uint8
        n = dataset.n_images
        self.array: Tensor | None = None
        if n * 3 * size * size <= predecode_mb * 2**20:
            self.array = decode_images(dataset, np.arange(n), to_uint8, num_workers, desc)

    def get(self, indices: np.ndarray) -> Tensor:
        if self.array is not None:
            return self.array[torch.as_tensor(indices)]
        return torch.stack([_hwc_to_chw(self.to_uint8(self.dataset.load_image(int(i)))) for i in indices])


def _hwc_to_chw(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def decode_images(
    dataset: Any, indices: np.ndarray, to_uint8: Callable, num_workers: int = 0, desc: str = "decoding images"
) -> Tensor:
    """Decode ``indices`` into one uint8 (N, 3, H, W) tensor (DataLoader workers when asked)."""
    loader = torch.utils.data.DataLoader(
        _DecodeSet(dataset, indices, to_uint8),
        batch_size=256,
        num_workers=num_workers,
        collate_fn=lambda xs: xs,
    )
    parts: list[Tensor] = []
    with _progress(disable=len(indices) < 2000) as bar:
        task = bar.add_task(desc, total=len(indices), info="")
        for batch in loader:
            parts.append(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous())
            bar.advance(task, len(batch))
    return torch.cat(parts) if parts else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def augment_params(n: int, gen: torch.Generator, min_scale: float = 0.85) -> Tensor:
    """(n, 2, 3) affine crops: random zoom-in (scale in [min_scale, 1]), the crop inside the image.

    No flips and no colour jitter: captions name left/right and colours.
    """
    s = min_scale + (1 - min_scale) * torch.rand(n, generator=gen)
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - s)[:, None]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = s, s, t
    return theta


def augment(images: Tensor, theta: Tensor) -> Tensor:
    """Apply ``augment_params`` crops to float (B, 3, H, W) images, bilinear."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---- the deterministic batch schedule ------------------------------------------------------------


class Schedule:
    """Which images and captions each step uses: a function of (seed, step) alone."""

    def __init__(
        self,
        valid_images: np.ndarray,
        caption_image_index: np.ndarray,
        batch: int,
        captions_per_image: int,
        seed: int,
    ):
        self.images = np.flatnonzero(valid_images)
        if len(self.images) < batch:
            raise ConfigError(
                f"batch_size {batch} is larger than the {len(self.images)} usable training images"
            )
        order = np.argsort(caption_image_index, kind="stable")
        counts = np.bincount(caption_image_index, minlength=len(valid_images))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.caps_sorted, self.cap_start, self.cap_count = order, starts, counts
        no_caption = self.images[counts[self.images] == 0]
        if len(no_caption):
            self.images = self.images[counts[self.images] > 0]
        self.batch, self.k, self.seed = batch, captions_per_image, seed
        self.steps_per_epoch = len(self.images) // batch

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.images)

    def step(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image ids (B,), caption ids (B*k,), caption image ids (B*k,)) of global step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        imgs = self._perm(epoch)[pos * self.batch : (pos + 1) * self.batch]
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        picks = (rng.random((len(imgs), self.k)) * self.cap_count[imgs][:, None]).astype(np.int64)
        caps = self.caps_sorted[self.cap_start[imgs][:, None] + picks].reshape(-1)
        return imgs, caps, np.repeat(imgs, self.k)


# ---- helpers ------------------------------------------------------------------------------------


def _progress(disable: bool = False) -> Progress:
    return (
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=_console,
            disable=disable,
            transient=False,
        )
        if not disable
        else Progress(disable=True)
    )


def _rank_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group if launched by torchrun; True if this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _device(cfg: DistillConfig) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"field 'device': {cfg.device} asked for but CUDA is not available")
    return torch.device(cfg.device)


def loss_config(cfg: DistillConfig) -> LossConfig:
    unknown = [n for n in cfg.losses if n not in LOSS_NAMES]
    if unknown:
        raise ConfigError(f"unknown loss(es) {', '.join(unknown)}; known: {', '.join(LOSS_NAMES)}")
    lc = LossConfig(
        **{n: n in cfg.losses for n in LOSS_NAMES}, temperature=cfg.temperature, margin=cfg.margin
    )
    lc.validate()
    return lc


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to 1, then cosine down to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings, logit scale (1-D or positional tensors)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim < 2 or "embedding" in name or name.startswith("logit_")
            (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _local_slice(global_n: int, rank: int, world: int) -> slice:
    per = global_n // world
    return slice(rank * per, (rank + 1) * per)


def _gather_with_local_grad(local: Tensor) -> Tensor:
    """All ranks' rows in rank order; this rank's rows are ``local`` itself, so they keep their gradient."""
    if not is_distributed():
        return local
    rank, world = _rank_world()
    full = gather_across_ranks(local)
    n = local.shape[0]
    return torch.cat([full[: rank * n], local, full[(rank + 1) * n :]])


@torch.no_grad()
def encode_split(
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Student embeddings (normalised float32 numpy) of uint8 images and token rows."""
    was = model.training
    model.eval()
    img, txt = [], []
    for s in range(0, len(images), batch):
        x = (images[s : s + batch].to(device).float() / 255 - mean.to(device)) / std.to(device)
        img.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    for s in range(0, len(tokens), batch):
        txt.append(F.normalize(model.encode_text(tokens[s : s + batch].to(device)).float(), dim=-1).cpu())
    model.train(was)
    empty = np.zeros((0, 0), np.float32)
    return (torch.cat(img).numpy() if img else empty), (torch.cat(txt).numpy() if txt else empty)


def _save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- data of one split ---------------------------------------------------------------------------


@dataclass
class SplitData:
    """A split ready for training or evaluation: cache, images, tokens."""

    cache: Any
    dataset: Any
    images: ImageStore
    tokens: Tensor  # (n_captions, context_length) int64


def open_split(
    cfg: DistillConfig,
    split: str,
    teacher: Any,
    teacher_id: str,
    to_uint8: Callable,
    size: int,
    tokenizer: Callable,
    desc: str = "",
) -> SplitData:
    """Open ``split``'s feature cache (built by ``teacher`` when missing) and the dataset it was made from.

    A cache of another teacher or of other data is refused (ArtifactError naming both).
    """
    from edge_msd.data import open_dataset
    from edge_msd.teachers.cache import FeatureCache, build_feature_cache

    dataset = open_dataset(cfg.data, split)
    path = cfg.feature_dir(split)
    if not (path / "manifest.json").is_file() and _rank_world()[0] == 0:
        if teacher is None:
            raise ArtifactError(f"no feature cache at {path} and no teacher configured to build it")
        _console.print(f"[bold]feature cache {path} missing: running teacher {cfg.teacher!r} over {split}")
        build_feature_cache(teacher, dataset, path)
    if is_distributed():
        dist.barrier()
    cache = FeatureCache.open(path, teacher_id=teacher_id, dataset_fingerprint=dataset.fingerprint())
    if cache.n_images != dataset.n_images or cache.n_captions != dataset.n_captions:
        raise ArtifactError(
            f"feature cache {path} has {cache.n_images} images / {cache.n_captions} captions, "
            f"dataset {cfg.data}:{split} has {dataset.n_images} / {dataset.n_captions}"
        )
    images = ImageStore(dataset, to_uint8, size, cfg.predecode_mb, cfg.num_workers, f"decoding {split}")
    tokens = tokenizer(list(dataset.captions)).long()
    return SplitData(cache, dataset, images, tokens)


def resolve_teacher(cfg: DistillConfig) -> tuple[Any, str]:
    """(teacher or None, the teacher id every cache must carry).

    With ``cfg.teacher`` set, that teacher is loaded (its id checks the caches; it builds missing ones).
    Without, the train cache's own teacher id is used, so every other split must come from it.
    """
    from edge_msd.teachers import load_teacher
    from edge_msd.teachers.cache import FeatureCache

    if cfg.teacher:
        teacher = load_teacher(cfg.teacher)
        return teacher, teacher.id
    path = cfg.feature_dir(cfg.train_split)
    if not (path / "manifest.json").is_file():
        raise ConfigError(f"no teacher configured and no feature cache at {path}: set --teacher")
    return None, FeatureCache.open(path, verify=False).teacher_id


# ---- training -----------------------------------------------------------------------------------


def train(
    cfg: DistillConfig,
    *,
    student: nn.Module | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Distil the teacher's cached embeddings into a student; returns the trained model and paths.

    Hooks, so that QAT reuses this loop:

    - ``student``: start from this open_clip model instead of a fresh ``cfg.preset`` (or ``cfg.init``).
    - ``prepare_model(model) -> model``: called once before the optimizer is built (e.g. insert
      fake-quant modules); the returned module must still have ``encode_image``/``encode_text``.
      Its ``state_dict`` is what checkpoints hold, so ``--resume`` calls it again before loading.
    - ``on_step(step, model)``: called after every optimizer step (step counted from 1), e.g. a
      quantizer's ``step()`` that advances its observer/fake-quant milestones.

    Without ``prepare_model`` the result is also saved as an open_clip student folder at
    ``out/student`` (best validation weights when a val split is set); with it, saving the
    prepared model is the caller's job (``TrainResult.model``).
    """
    cfg.validate()
    out = Path(out_dir) if out_dir is not None else cfg.out_dir()
    device = _device(cfg)
    created_pg = _init_distributed(device)
    try:
        return _train(cfg, out, device, student, prepare_model, on_step, progress)
    finally:
        if created_pg:
            dist.destroy_process_group()


def _prepare_out(cfg: DistillConfig, out: Path, rank: int) -> None:
    ckpt = out / CKPT_DIR / LAST
    saved_cfg = out / "config.json"
    if rank != 0:
        return
    if cfg.resume:
        if not ckpt.is_file():
            raise ArtifactError(f"--resume: no checkpoint at {ckpt}")
        before = json.loads(saved_cfg.read_text(encoding="utf-8")) if saved_cfg.is_file() else None
        now = _run_identity(cfg)
        if before is not None and before != now:
            diff = sorted(k for k in now if before.get(k) != now[k])
            raise ConfigError(
                f"--resume: {out} was trained with other settings ({', '.join(diff)}); "
                "resume with the same config, or start afresh with --force"
            )
        return
    if ckpt.is_file() and not cfg.force:
        raise ArtifactError(
            f"{out} already holds a run ({ckpt}); pass --resume to continue it or --force to start afresh"
        )
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / CKPT_DIR / LAST, out / CKPT_DIR / BEST, out / METRICS):
        stale.unlink(missing_ok=True)
    atomic_write_json(saved_cfg, _run_identity(cfg))
    save_config(cfg, out / "config.toml")


def _run_identity(cfg: DistillConfig) -> dict[str, Any]:
    """The settings a resumed run must share (not resume/force/workers/progress-only knobs)."""
    d = config_to_dict(cfg)
    for k in ("resume", "force", "num_workers", "predecode_mb", "out"):
        d.pop(k)
    return json.loads(json.dumps(d))


def _train(
    cfg: DistillConfig,
    out: Path,
    device: torch.device,
    student: nn.Module | None,
    prepare_model: Callable | None,
    on_step: Callable | None,
    progress: bool,
) -> TrainResult:
    import open_clip

    rank, world = _rank_world()
    loss_cfg = loss_config(cfg)
    micro = cfg.batch_size // cfg.accum_steps
    if micro % world:
        raise ConfigError(f"micro-batch {micro} (batch_size / accum_steps) is not divisible by {world} ranks")
    queue_rows = micro * cfg.captions_per_image
    if cfg.queue_size < queue_rows:
        raise ConfigError(
            f"queue_size {cfg.queue_size} cannot take a batch of {micro} images with "
            f"{cfg.captions_per_image} caption(s) each ({queue_rows} rows); use queue_size >= "
            f"{queue_rows} or a smaller batch"
        )
    _prepare_out(cfg, out, rank)
    if is_distributed():
        dist.barrier()

    torch.manual_seed(cfg.seed)
    model_cfg = preset_config(cfg.preset)  # validates the preset name (lists the known ones)
    teacher, teacher_id = resolve_teacher(cfg)
    to_uint8, mean, std = split_preprocess(student_transform(model_cfg))
    size = int(model_cfg["vision_cfg"]["image_size"])
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])
    train_data = open_split(cfg, cfg.train_split, teacher, teacher_id, to_uint8, size, tokenizer)
    val_data = (
        open_split(cfg, cfg.val_split, teacher, teacher_id, to_uint8, size, tokenizer)
        if cfg.val_split
        else None
    )
    t_dim = train_data.cache.dim

    if student is None:
        if cfg.init:
            loaded = load_student(cfg.init)
            if loaded.preset != cfg.preset:
                raise ConfigError(
                    f"field 'init': {cfg.init} is a {loaded.preset} student but preset is {cfg.preset}"
                )
            student = loaded.model
        else:
            student = create_student(cfg.preset, embed_dim=cfg.embed_dim or t_dim)
    model: nn.Module = student.to(device)
    s_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else t_dim
    adaptor: nn.Module = nn.Identity()
    if s_dim != t_dim:
        # Shared by both towers so that the student's own image and text spaces stay aligned.
        adaptor = nn.Linear(s_dim, t_dim, bias=False)
        nn.init.orthogonal_(adaptor.weight)
    adaptor = adaptor.to(device)
    if prepare_model is not None:
        model = prepare_model(model)
    model = sync_batchnorm(model, device)
    if is_distributed():  # identical start on all ranks
        for t in list(model.state_dict().values()) + list(adaptor.state_dict().values()):
            if t.is_floating_point():
                dist.broadcast(t, 0)
    model.train()

    balancer_kw: dict[str, Any] = (
        {"temperature": cfg.balancer_temperature} if cfg.balancer == "dynamic" else {}
    )
    balancer = make_balancer(cfg.balancer, loss_cfg.names(), **balancer_kw).to(device)
    queue = TeacherQueue(cfg.queue_size, t_dim).to(device) if loss_cfg.contrastive else None
    params_from = [model, adaptor, balancer]
    optimizer = torch.optim.AdamW(
        _param_groups(params_from, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    trainable = [p for m in params_from for p in m.parameters() if p.requires_grad]

    schedule = Schedule(
        train_data.cache.valid_images,
        train_data.cache.caption_image_index,
        micro,
        cfg.captions_per_image,
        cfg.seed,
    )
    t_img_all = torch.from_numpy(train_data.cache.image(np.arange(train_data.cache.n_images)))
    t_txt_all = torch.from_numpy(train_data.cache.text(np.arange(train_data.cache.n_captions)))
    state = {"step": 0, "skipped": 0, "bad_in_row": 0, "best_rsum": None, "samples": 0}
    ckpt_dir = out / CKPT_DIR
    if cfg.resume:
        ck = torch.load(ckpt_dir / LAST, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        adaptor.load_state_dict(ck["adaptor"])
        balancer.load_state_dict(ck["balancer"])
        if queue is not None:
            queue.load_state_dict(ck["queue"])
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        state.update(ck["state"])
        _truncate_metrics(out / METRICS, state["step"])
        if rank == 0:
            _console.print(f"resumed {out} at step {state['step']}")

    use_bf16 = cfg.bf16 and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext
    sl = _local_slice(micro, rank, world)
    metrics_f = open(out / METRICS, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    history: list[dict] = []
    val_metrics: dict | None = None

    mean_d, std_d = mean.to(device), std.to(device)

    def micro_batch(gstep: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        imgs, caps, cap_img = schedule.step(gstep)
        x = train_data.images.get(imgs[sl]).to(device, non_blocking=True).float() / 255  # uint8 travels
        if cfg.augment:
            # Drawn for the global batch, this rank's rows used: the same crops at any world size.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + gstep)
            x = augment(x, augment_params(micro, gen)[sl].to(device))
        x = (x - mean_d) / std_d
        csl = slice(sl.start * cfg.captions_per_image, sl.stop * cfg.captions_per_image)
        tokens = train_data.tokens[caps[csl]]
        return (
            x,
            tokens,
            t_img_all[imgs],
            t_txt_all[caps],
            torch.from_numpy(imgs),
            torch.from_numpy(cap_img),
        )

    t_last, samples_since = time.perf_counter(), 0
    disable = not progress or rank != 0
    with _progress(disable=disable) as bar:
        task = bar.add_task("distill", total=cfg.steps, completed=state["step"], info="")
        while state["step"] < cfg.steps:
            step = state["step"]
            lr = cfg.lr * lr_factor(step, cfg)  # a function of the step: resumes exactly, no scheduler state
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            ok = True
            logged: dict[str, float] = {}
            weights: dict[str, float] = {}
            total_val = 0.0
            for a in range(cfg.accum_steps):
                x, tokens, t_img, t_txt, img_ids, cap_ids = micro_batch(step * cfg.accum_steps + a)
                tokens = tokens.to(device, non_blocking=True)
                t_img, t_txt = t_img.to(device), t_txt.to(device)
                img_ids, cap_ids = img_ids.to(device), cap_ids.to(device)
                with autocast():
                    s_img = adaptor(model.encode_image(x))
                    s_txt = adaptor(model.encode_text(tokens))
                s_img = _gather_with_local_grad(s_img.float())
                s_txt = _gather_with_local_grad(s_txt.float())
                losses = distill_losses(s_img, s_txt, t_img, t_txt, img_ids, cap_ids, queue, loss_cfg)
                total, weights = balancer(losses)
                if queue is not None:  # after the loss: the queue never holds this batch's positives
                    queue.enqueue(t_img, t_txt, img_ids, cap_ids)
                for k, v in losses.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg.accum_steps
                if not torch.isfinite(total):
                    ok = False
                    break
                total_val += float(total.detach()) / cfg.accum_steps
                # Every rank holds the whole global loss but backprops only its own rows: x world
                # makes the all-reduced mean gradient equal the 1-process gradient.
                (total * world / cfg.accum_steps).backward()
            grad_norm = float("nan")
            if ok:
                if is_distributed():
                    for p in trainable:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= world
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
                ok = math.isfinite(grad_norm)
            if ok:
                optimizer.step()
                average_batchnorm_stats(model)
                state["bad_in_row"] = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                state["skipped"] += 1
                state["bad_in_row"] += 1
                if rank == 0:
                    _console.print(
                        f"[yellow]step {step + 1}: non-finite loss or gradient "
                        f"({', '.join(f'{k}={v:.4g}' for k, v in logged.items())}); step skipped "
                        f"({state['skipped']} so far)"
                    )
                if state["bad_in_row"] >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state['bad_in_row']} steps in a row had a NaN/inf loss or gradient (last at step "
                        f"{step + 1}); lower lr (now {cfg.lr}) or check the feature cache "
                        f"{cfg.feature_dir(cfg.train_split)}. Checkpoint {ckpt_dir / LAST} is from before"
                    )
            state["step"] = step + 1
            state["samples"] += cfg.batch_size
            samples_since += cfg.batch_size
            if on_step is not None:
                on_step(state["step"], model)
            now = time.perf_counter()
            rate = samples_since / max(now - t_last, 1e-9)
            record = {
                "step": state["step"],
                "lr": lr,
                "loss": total_val if ok else None,
                "losses": logged,
                "weights": weights,
                "grad_norm": grad_norm,
                "samples_per_s": rate,
                "skipped": not ok,
                "skipped_total": state["skipped"],
            }
            history.append(record)
            if metrics_f:
                metrics_f.write(json.dumps(record) + "\n")
                metrics_f.flush()
            w_txt = " ".join(f"{k[:4]}={v:.2f}" for k, v in weights.items())
            bar.update(
                task, completed=state["step"], info=f"loss {total_val:.3f} | w {w_txt} | {rate:.0f} samples/s"
            )
            if state["step"] % 20 == 0:
                t_last, samples_since = now, 0
            last = state["step"] == cfg.steps
            if val_data is not None and (state["step"] % cfg.eval_every == 0 or last):
                val_metrics = validate(model, val_data, mean, std, device)
                rsum = val_metrics["rsum"]
                if rank == 0:
                    rec = {"step": state["step"], "val": val_metrics}
                    history.append(rec)
                    if metrics_f:
                        metrics_f.write(json.dumps(rec) + "\n")
                        metrics_f.flush()
                    _console.print(
                        f"step {state['step']}: val R-sum {rsum:.1f} (mean R@1 {val_metrics['mean_R@1']:.1f})"
                    )
                if state["best_rsum"] is None or rsum > state["best_rsum"]:
                    state["best_rsum"] = rsum
                    if rank == 0:
                        _save_torch(
                            ckpt_dir / BEST,
                            {"model": model.state_dict(), "step": state["step"], "val": val_metrics},
                        )
            if (state["step"] % cfg.ckpt_every == 0 or last) and rank == 0:
                _save_torch(
                    ckpt_dir / LAST,
                    {
                        "model": model.state_dict(),
                        "adaptor": adaptor.state_dict(),
                        "balancer": balancer.state_dict(),
                        "queue": queue.state_dict() if queue is not None else {},
                        "optimizer": optimizer.state_dict(),
                        "rng": _rng_state(),
                        "state": dict(state),
                    },
                )
    if metrics_f:
        metrics_f.close()

    if val_data is not None and (ckpt_dir / BEST).is_file():
        if is_distributed():
            dist.barrier()
        best = torch.load(ckpt_dir / BEST, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        val_metrics = best["val"]
    result = TrainResult(
        model=model,
        out_dir=out,
        steps=state["step"],
        skipped_steps=state["skipped"],
        best_val_rsum=state["best_rsum"],
        val=val_metrics,
        history=history,
        teacher=teacher,
        teacher_id=teacher_id,
        preprocess=(to_uint8, mean, std),
        tokenizer=tokenizer,
    )
    if rank == 0:
        plot_metrics(out / METRICS, out / PLOT)
        if prepare_model is None:
            result.student_dir = save_student(
                model,
                out / "student",
                cfg.preset,
                extra_manifest={
                    "distill_config": config_to_dict(cfg),
                    "teacher_id": teacher_id,
                    "steps": state["step"],
                    "skipped_steps": state["skipped"],
                    "best_val": val_metrics,
                    # what later stages default to (edge_msd.lineage)
                    "data": cfg.data,
                    "teacher": cfg.teacher,
                    "features": str(Path(cfg.features).resolve()),
                    "splits": {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split},
                },
            )
    return result


def validate(model: nn.Module, data: SplitData, mean: Tensor, std: Tensor, device: torch.device) -> dict:
    """Student retrieval metrics on a split (its valid images and their captions)."""
    valid = np.flatnonzero(data.cache.valid_images)
    cap_img = data.cache.caption_image_index
    keep = np.isin(cap_img, valid)
    remap = np.full(len(data.cache.valid_images), -1, dtype=np.int64)
    remap[valid] = np.arange(len(valid))
    imgs = data.images.get(valid)
    tokens = data.tokens[torch.from_numpy(np.flatnonzero(keep))]
    img, txt = encode_split(model, imgs, tokens, mean, std, device)
    return retrieval_metrics(img, txt, remap[cap_img[keep]])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint a run resumes from, so the log reads as one run."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> Iterator[dict]:
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def plot_metrics(metrics: Path, out_png: Path) -> None:
    """losses.png: every loss (log scale) and every balancer weight against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics) if "losses" in r]
    if not records:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    steps = [r["step"] for r in records]
    for name in records[-1]["losses"]:
        ax1.plot(steps, [r["losses"].get(name, float("nan")) for r in records], label=name)
        ax2.plot(steps, [r["weights"].get(name, float("nan")) for r in records], label=name)
    ax1.set_yscale("log")
    ax1.set_ylabel("loss")
    ax2.set_ylabel("balancer weight")
    ax2.set_xlabel("step")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax1.set_title("distillation losses and weights")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())


def with_overrides(cfg: DistillConfig, **kw: Any) -> DistillConfig:
    """A copy of ``cfg`` with fields replaced and validated (used by the benchmark and tests)."""
    new = replace(cfg, **kw)
    new.validate()
    return new
