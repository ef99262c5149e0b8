"""The DSMD distillation trainer: cached teacher embeddings → a small open_clip student.

The student sees raw images (decoded once into a uint8 array when they fit in memory, resized by
the student's own preprocess) and tokenized captions; the teacher is present only through its
feature cache. Every batch is a function of (seed, step) alone: step s takes images
``perm_e[o : o + B]`` of epoch e's permutation (sample ids, never cache batch positions), its
captions and augmentation come from a generator seeded by (seed, step). So a resumed run sees
exactly the data an uninterrupted one would, and under ``torchrun`` rank r takes slice r of the
same global batch: the embeddings are gathered back into the global batch (teacher rows and the
queue are identical on every rank, the rank's own student rows keep their gradient), so in-batch
hard negatives and the queue span all ranks, and DistributedDataParallel's gradient average makes
2 processes compute what 1 process would (see ``edge_msd.distill.dist``). BatchNorm (the
mobile-CNN image towers) is the exception: on CUDA it becomes SyncBatchNorm, which normalises with
the global batch; elsewhere each rank normalises with its own rows, as plain DDP does, and the
running statistics are averaged over ranks after every step.

Randomness is owned: the student's initialisation draws from its own generator seeded by the seed,
the rest of the run from the seed reset after the data is ready, so side work such as building a
missing feature cache cannot change a run. Images a feature cache marked bad (``--skip-bad``) are
never decoded, trained on or evaluated; they are counted in ``metrics.jsonl`` and ``eval.json``.

One loop serves distillation and QAT (``edge_msd.quant`` calls ``train`` with hooks). Its parts, as
open_clip's training code splits them: ``splits`` (caches and data), ``images``, ``schedule`` (data
order, lr), ``dist`` (torchrun, DDP), ``checkpoint`` (run folder, resume, RNG), ``validation``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from edge_msd import paths
from edge_msd.config import config_to_dict
from edge_msd.distill.balancer import make_balancer
from edge_msd.distill.checkpoint import (
    BEST,
    CKPT_DIR,
    LAST,
    METRICS,
    PLOT,
    check_out,
    load_checkpoint,
    load_state,
    own_rng,
    restore,
    save_last,
    save_torch,
    start_afresh,
    truncate_metrics,
)
from edge_msd.distill.config import DistillConfig
from edge_msd.distill.dist import (
    StudentStep,
    average_batchnorm_stats,
    data_parallel,
    gather_with_local_grad,
    sync_batchnorm,
)
from edge_msd.distill.ema import student_ema
from edge_msd.distill.images import console, progress_bar, split_preprocess
from edge_msd.distill.losses import LOSS_NAMES, LossConfig, distill_losses
from edge_msd.distill.queue import TeacherQueue
from edge_msd.distill.schedule import Batches, lr_factor, param_groups
from edge_msd.distill.splits import SplitData, open_split, resolve_teacher
from edge_msd.distill.validation import plot_metrics, validate
from edge_msd.errors import ConfigError, EdgeMSDError
from edge_msd.lineage import StudentRecord
from edge_msd.students import load_open_clip_student, save_student, student_transform
from edge_msd.students.presets import WEIGHTS_FILE, embed_dim_of
from edge_msd.students.spec import build_of, build_student, init_start, remember_build, run_model_config
from edge_msd.torchrun import barrier, is_distributed, process_group, rank_device, rank_world


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
    skipped_data: dict[str, dict[str, int]] = field(default_factory=dict)  # per split, see SplitData.skipped
    teacher: Any = None  # the loaded teacher, when cfg.teacher named one
    teacher_id: str = ""
    preprocess: tuple | None = None  # (PIL -> uint8 HWC, mean, std): what the student saw
    tokenizer: Callable | None = None


def _device(cfg: DistillConfig) -> torch.device:
    """This process's device: under torchrun, ``cuda`` is the rank's own ``cuda:LOCAL_RANK``."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"field 'device': {cfg.device} asked for but CUDA is not available")
    return torch.device(rank_device(cfg.device))


def loss_config(cfg: DistillConfig) -> LossConfig:
    unknown = [n for n in cfg.losses if n not in LOSS_NAMES]
    if unknown:
        raise ConfigError(f"unknown loss(es) {', '.join(unknown)}; known: {', '.join(LOSS_NAMES)}")
    lc = LossConfig(
        **{n: n in cfg.losses for n in LOSS_NAMES}, temperature=cfg.temperature, margin=cfg.margin
    )
    lc.validate()
    return lc


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
    with process_group(device):
        return _train(cfg, out, device, student, prepare_model, on_step, progress)


def _student_and_adaptor(
    cfg: DistillConfig, student: nn.Module | None, t_dim: int
) -> tuple[nn.Module, nn.Module]:
    """The student to train (given, ``cfg.init`` or a fresh preset) + adaptor from its width to t_dim."""
    if student is None and cfg.init:
        loaded = load_open_clip_student(cfg.init)
        if loaded.preset != cfg.preset:
            raise ConfigError(
                f"field 'init': {cfg.init} is a {loaded.preset} student but preset is {cfg.preset}"
            )
        start = init_start(cfg.preset, cfg.init, loaded.manifest["files"][WEIGHTS_FILE])
        student = remember_build(loaded.model, run_model_config(cfg.preset, cfg.image_size, cfg.init), start)
    if student is None:
        student = build_student(cfg.preset, cfg.embed_dim, cfg.image_size, default_dim=t_dim).model
    has_text = hasattr(student, "text_projection") or hasattr(student, "text")
    s_dim = embed_dim_of(student) if has_text else t_dim
    adaptor: nn.Module = nn.Identity()
    if s_dim != t_dim:
        # Shared by both towers so that the student's own image and text spaces stay aligned.
        adaptor = nn.Linear(s_dim, t_dim, bias=False)
        nn.init.orthogonal_(adaptor.weight)
    return student, adaptor


@dataclass
class _Data:
    """The splits a run reads and what was used to open them."""

    train: SplitData
    val: SplitData | None
    teacher: Any
    teacher_id: str
    preprocess: tuple  # (PIL -> uint8 HWC, mean, std)
    tokenizer: Callable


def _open_data(cfg: DistillConfig, device: torch.device) -> _Data:
    import open_clip

    model_cfg = run_model_config(cfg.preset, cfg.image_size, cfg.init)  # validates the spec first
    teacher, teacher_id = resolve_teacher(cfg, device)
    to_uint8, mean, std = split_preprocess(student_transform(model_cfg))
    size = int(model_cfg["vision_cfg"]["image_size"])
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])

    def split(name: str) -> SplitData:
        return open_split(cfg, name, teacher, teacher_id, to_uint8, size, tokenizer)

    return _Data(split(cfg.train_split), split(cfg.val_split) if cfg.val_split else None, teacher, teacher_id,
                 (to_uint8, mean, std), tokenizer)


def _micro_batch(cfg: DistillConfig, world: int) -> int:
    """Images per micro-batch over all ranks; ConfigError when ranks or queue cannot take it."""
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
    return micro


@dataclass
class _Run:
    """One run's moving parts (built by ``_setup``) and its progress."""

    cfg: DistillConfig
    out: Path
    device: torch.device
    model: nn.Module
    adaptor: nn.Module
    forward: nn.Module  # StudentStep, wrapped in DistributedDataParallel under torchrun
    balancer: nn.Module
    queue: TeacherQueue | None
    optimizer: torch.optim.Optimizer
    loss_cfg: LossConfig
    batches: Batches
    data: _Data
    ema: nn.Module | None = None  # AveragedModel of ``model`` when cfg.ema_decay > 0
    state: dict[str, Any] = field(
        default_factory=lambda: {"step": 0, "skipped": 0, "bad_in_row": 0, "best_rsum": None, "samples": 0}
    )
    history: list[dict] = field(default_factory=list)
    val: dict | None = None

    def parts(self) -> dict[str, Any]:
        """What ``last.pt`` holds besides the RNG and ``state``."""
        return {"model": self.model, "adaptor": self.adaptor, "balancer": self.balancer, "queue": self.queue,
                "optimizer": self.optimizer, "ema": self.ema}

    def eval_model(self) -> nn.Module:
        """The model that is validated and saved: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def trainable(self) -> list[nn.Parameter]:
        modules = (self.model, self.adaptor, self.balancer)
        return [p for m in modules for p in m.parameters() if p.requires_grad]


def _train(
    cfg: DistillConfig,
    out: Path,
    device: torch.device,
    student: nn.Module | None,
    prepare_model: Callable | None,
    on_step: Callable | None,
    progress: bool,
) -> TrainResult:
    rank = rank_world()[0]
    run = prepare_run(cfg, out, device, student, prepare_model)
    if cfg.resume:
        restore(out / CKPT_DIR / LAST, run.parts(), run.state)
        if rank == 0:  # rank 0 alone writes metrics.jsonl (it appends to it later)
            truncate_metrics(out / METRICS, run.state["step"])
            console.print(f"resumed {out} at step {run.state['step']}")
    _loop(run, on_step, progress)
    return _finish(run, save=prepare_model is None)


def prepare_run(
    cfg: DistillConfig,
    out: Path,
    device: torch.device,
    student: nn.Module | None = None,
    prepare_model: Callable | None = None,
) -> _Run:
    """The run ``train`` starts its loop with: out folder, data, student, optimizer, losses, batches.

    The out folder is checked first; a fresh run clears the previous one there only at the end, once
    all else is ready. Public for the throughput benchmark, which trains the same parts on tensors in memory.
    """
    rank, world = rank_world()
    micro = _micro_batch(cfg, world)
    check_out(cfg, out, rank)
    barrier()
    data = _open_data(cfg, device)
    run = _setup(cfg, out, device, data, micro, student, prepare_model)
    if rank == 0 and not cfg.resume:
        start_afresh(cfg, out)
    return run


def _setup(
    cfg: DistillConfig,
    out: Path,
    device: torch.device,
    data: _Data,
    micro: int,
    student: nn.Module | None,
    prepare_model: Callable | None,
) -> _Run:
    t_dim = data.train.cache.dim
    with own_rng(cfg.seed):  # the student's init depends on the seed alone, not on what ran before
        model, adaptor = _student_and_adaptor(cfg, student, t_dim)
    torch.manual_seed(cfg.seed)  # everything after draws from here, whatever the side work consumed
    model, adaptor = model.to(device), adaptor.to(device)
    if prepare_model is not None:
        model = prepare_model(model)
    model = sync_batchnorm(model, device)
    model.train()
    forward = data_parallel(StudentStep(model, adaptor), device)  # DDP copies rank 0's weights to all
    loss_cfg = loss_config(cfg)
    balancer_kw: dict[str, Any] = (
        {"temperature": cfg.balancer_temperature} if cfg.balancer == "dynamic" else {}
    )
    balancer = make_balancer(cfg.balancer, loss_cfg.names(), **balancer_kw).to(device)
    queue = TeacherQueue(cfg.queue_size, t_dim).to(device) if loss_cfg.contrastive else None
    optimizer = torch.optim.AdamW(
        param_groups([model, adaptor, balancer], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
        foreach=True,  # on CPU too (torch's default there is a Python loop over the tensors)
    )
    _, mean, std = data.preprocess
    batches = Batches(cfg, data.train, micro, mean, std, device)
    ema = student_ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return _Run(
        cfg, out, device, model, adaptor, forward, balancer, queue, optimizer, loss_cfg, batches, data, ema
    )


def _loop(run: _Run, on_step: Callable | None, progress: bool) -> None:
    """Optimizer steps until ``cfg.steps``, each logged to metrics.jsonl; validation, checkpoints on time."""
    cfg, state, rank = run.cfg, run.state, rank_world()[0]
    skipped_data = {s.dataset.split: s.skipped() for s in (run.data.train, run.data.val) if s}
    metrics_f = open(run.out / METRICS, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    if metrics_f and not cfg.resume:
        _write(metrics_f, {"step": 0, "skipped_data": skipped_data})
    t_last, samples_since = time.perf_counter(), 0
    with progress_bar(disable=not progress or rank != 0) as bar:
        task = bar.add_task("distill", total=cfg.steps, completed=state["step"], info="")
        while state["step"] < cfg.steps:
            record = _step(run)
            if on_step is not None:
                on_step(state["step"], run.model)
            samples_since += cfg.batch_size
            now = time.perf_counter()
            record["samples_per_s"] = rate = samples_since / max(now - t_last, 1e-9)
            run.history.append(record)
            _write(metrics_f, record)
            w_txt = " ".join(f"{k[:4]}={v:.2f}" for k, v in record["weights"].items())
            loss = record["loss"] if record["loss"] is not None else float("nan")
            info = f"loss {loss:.3f} | w {w_txt} | {rate:.0f} samples/s"
            bar.update(task, completed=state["step"], info=info)
            if state["step"] % 20 == 0:
                t_last, samples_since = now, 0
            _validate_and_checkpoint(run, metrics_f)
    if metrics_f:
        metrics_f.close()


def _write(metrics_f: IO[str] | None, record: dict) -> None:
    if metrics_f:
        metrics_f.write(json.dumps(record) + "\n")
        metrics_f.flush()


def _step(run: _Run) -> dict[str, Any]:
    """One optimizer step (or a skipped one, counted); its metrics record without the rate."""
    cfg, state = run.cfg, run.state
    step = state["step"]
    lr = cfg.lr * lr_factor(step, cfg)  # a function of the step: resumes exactly, no scheduler state
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    ok, total, logged, weights = _accumulate(run, step)
    grad_norm = float("nan")
    if ok:
        world = rank_world()[1]
        for p in run.balancer.parameters():  # outside DDP, and the same on every rank: undo x world
            if p.grad is not None:
                p.grad /= world
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable(), clip))
        ok = math.isfinite(grad_norm)
    if ok:
        run.optimizer.step()
        average_batchnorm_stats(run.model)
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        state["bad_in_row"] = 0
    else:
        _skip(run, step, logged)
    state["step"] = step + 1
    state["samples"] += cfg.batch_size
    return {"step": state["step"], "lr": lr, "loss": total if ok else None, "losses": logged,
            "weights": weights, "grad_norm": grad_norm, "skipped": not ok, "skipped_total": state["skipped"]}


def _accumulate(run: _Run, step: int) -> tuple[bool, float, dict[str, float], dict[str, float]]:
    """Forward and backward of the step's micro-batches: (all finite, loss, losses, balancer weights)."""
    cfg = run.cfg
    world = rank_world()[1]
    use_bf16 = cfg.bf16 and run.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    logged: dict[str, float] = {}
    weights: dict[str, float] = {}
    total_val = 0.0
    for a in range(cfg.accum_steps):
        x, tokens, t_img, t_txt, img_ids, cap_ids = run.batches(step * cfg.accum_steps + a)
        # DDP averages the gradients once per step, after the last micro-batch.
        sync = a == cfg.accum_steps - 1 or not is_distributed()
        with contextlib.nullcontext() if sync else run.forward.no_sync():
            with autocast():
                s_img, s_txt = run.forward(x, tokens)
            s_img = gather_with_local_grad(s_img.float())
            s_txt = gather_with_local_grad(s_txt.float())
            losses = distill_losses(s_img, s_txt, t_img, t_txt, img_ids, cap_ids, run.queue, run.loss_cfg)
            total, weights = run.balancer(losses)
            if run.queue is not None:  # after the loss: the queue never holds this batch's positives
                run.queue.enqueue(t_img, t_txt, img_ids, cap_ids)
            for k, v in losses.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / cfg.accum_steps
            if not torch.isfinite(total):  # the loss is global: every rank stops here alike
                return False, total_val, logged, weights
            total_val += float(total.detach()) / cfg.accum_steps
            # Every rank holds the whole global loss but backprops only its own rows: x world
            # makes DDP's mean gradient over ranks equal the 1-process gradient.
            (total * world / cfg.accum_steps).backward()
    return True, total_val, logged, weights


def _skip(run: _Run, step: int, logged: dict[str, float]) -> None:
    """Count a non-finite step; too many in a row is a NonFiniteLossError."""
    cfg, state = run.cfg, run.state
    run.optimizer.zero_grad(set_to_none=True)
    state["skipped"] += 1
    state["bad_in_row"] += 1
    if rank_world()[0] == 0:
        console.print(
            f"[yellow]step {step + 1}: non-finite loss or gradient "
            f"({', '.join(f'{k}={v:.4g}' for k, v in logged.items())}); step skipped "
            f"({state['skipped']} so far)"
        )
    if state["bad_in_row"] >= cfg.max_bad_steps:
        raise NonFiniteLossError(
            f"{state['bad_in_row']} steps in a row had a NaN/inf loss or gradient (last at step "
            f"{step + 1}); lower lr (now {cfg.lr}) or check the feature cache "
            f"{cfg.feature_dir(cfg.train_split)}. Checkpoint {run.out / CKPT_DIR / LAST} is from before"
        )


def _validate_and_checkpoint(run: _Run, metrics_f: IO[str] | None) -> None:
    """Validate every ``eval_every`` steps (best.pt on a new best R-sum), checkpoint every ``ckpt_every``."""
    cfg, state, rank = run.cfg, run.state, rank_world()[0]
    ckpt_dir = run.out / CKPT_DIR
    last = state["step"] == cfg.steps
    if run.data.val is not None and (state["step"] % cfg.eval_every == 0 or last):
        _, mean, std = run.data.preprocess
        run.val = validate(run.eval_model(), run.data.val, mean, std, run.device)
        rsum = run.val["rsum"]
        if rank == 0:
            rec = {"step": state["step"], "val": run.val}
            run.history.append(rec)
            _write(metrics_f, rec)
            console.print(f"step {state['step']}: val R-sum {rsum:.1f} (mean R@1 {run.val['mean_R@1']:.1f})")
        if state["best_rsum"] is None or rsum > state["best_rsum"]:
            state["best_rsum"] = rsum
            if rank == 0:
                best = {"model": run.eval_model().state_dict(), "step": state["step"], "val": run.val}
                save_torch(ckpt_dir / BEST, best)
    if (state["step"] % cfg.ckpt_every == 0 or last) and rank == 0:
        save_last(ckpt_dir / LAST, run.parts(), state)


def _finish(run: _Run, save: bool) -> TrainResult:
    """Back to the best validation weights, the plot, and (``save``) the student folder."""
    cfg, state, out, data = run.cfg, run.state, run.out, run.data
    best_path = out / CKPT_DIR / BEST
    if run.ema is not None:
        run.model.load_state_dict(run.ema.module.state_dict())
    if data.val is not None:
        barrier()  # rank 0 has written best.pt
    if data.val is not None and best_path.is_file():
        best = load_checkpoint(best_path, ("model", "val"))
        load_state(run.model, best["model"], best_path, "model")
        run.val = best["val"]
    result = TrainResult(
        model=run.model,
        out_dir=out,
        steps=state["step"],
        skipped_steps=state["skipped"],
        best_val_rsum=state["best_rsum"],
        val=run.val,
        history=run.history,
        skipped_data={s.dataset.split: s.skipped() for s in (data.train, data.val) if s},
        teacher=data.teacher,
        teacher_id=data.teacher_id,
        preprocess=data.preprocess,
        tokenizer=data.tokenizer,
    )
    if rank_world()[0] == 0:
        plot_metrics(out / METRICS, out / PLOT)
        if save:
            folder = out / paths.STUDENT_FOLDER
            # what later stages default to
            record = StudentRecord(folder, data=cfg.data, features=str(Path(cfg.features).resolve()),
                                   teacher=cfg.teacher, teacher_id=data.teacher_id,
                                   splits={"train": cfg.train_split, "val": cfg.val_split,
                                           "test": cfg.test_split})
            extra = {"distill_config": config_to_dict(cfg), "steps": state["step"],
                     "skipped_steps": state["skipped"], "best_val": run.val, **record.to_manifest()}
            model_cfg, start = build_of(run.model)  # the spec's config and start (spec, weights, sha256)
            result.student_dir = save_student(run.model, folder, cfg.preset, extra_manifest=extra,
                                              model_cfg=model_cfg, start=start)
    return result


def with_overrides(cfg: DistillConfig, **kw: Any) -> DistillConfig:
    """A copy of ``cfg`` with fields replaced and validated (used by the benchmark and tests)."""
    new = replace(cfg, **kw)
    new.validate()
    return new
