"""DSMD multi-scale distillation losses (arXiv 2404.10838), computed on L2-normalised embeddings.

Inputs: student and teacher embeddings of B images and of C captions (several captions of one
image may be in the batch), the image id of each image row and the image id each caption describes.

Same-image rule (a pitfall of the public code): a key with the query's image id is never a
negative, in the batch or in the queue. Keys of the current batch that belong to the query (its
own teacher embedding; for cross-modal queries every teacher row of its image) are positives; every
other key with that id (older copies in the queue) is simply left out. A query with P positives
averages P InfoNCE terms, each positive competing against the negatives only, so two identical
captions of one image give exactly the loss of one.

The losses are computed in float32 with autocast off: bf16 logits at τ = 0.07 lose too much.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from edge_msd.config import field
from edge_msd.distill.queue import TeacherQueue
from edge_msd.errors import ConfigError

LOSS_NAMES = ("contrastive", "feature", "similarity", "hard_negative", "clip", "affinity")
_OFF = -1e9  # logit of a masked key: finite, so that a row without negatives has no NaN gradient


@dataclass
class LossConfig:
    """Which distillation losses to compute, and their hyper-parameters."""

    contrastive: bool = field(True, help="contrastive distillation against teacher embeddings and the queue")
    feature: bool = field(True, help="feature distillation: L1 between student and teacher embeddings")
    similarity: bool = field(True, help="similarity distillation: 1 - cosine(student, teacher)")
    hard_negative: bool = field(True, help="hard-negative distillation: VSE++ max-violation triplet")
    clip: bool = field(False, help="plain student image-text InfoNCE (baseline, not distillation)")
    affinity: bool = field(False, help="affinity mimicking: KL(teacher || student) of image<->text softmax")
    temperature: float = field(0.07, help="temperature of contrastive distillation and of the clip loss")
    margin: float = field(0.2, help="margin of the hard-negative triplet loss")
    affinity_temperature: float = field(0.07, help="temperature of the affinity softmax")

    def names(self) -> list[str]:
        """The enabled losses, in the fixed order of LOSS_NAMES."""
        return [n for n in LOSS_NAMES if getattr(self, n)]

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in LOSS_NAMES and not isinstance(value, bool):
                raise ConfigError(f"loss switch '{f.name}' must be true or false, got {value!r}")
        for name in ("temperature", "affinity_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(self.margin, int | float) and 0 <= self.margin < float("inf")):
            raise ConfigError(f"margin must be a number >= 0, got {self.margin!r}")
        if not self.names():
            raise ConfigError(f"no loss enabled; enable at least one of {', '.join(LOSS_NAMES)}")


def _multi_positive_nce(logits: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Mean over rows of the mean over each row's positives p of −log(e^p / (e^p + Σ_neg e^n))."""
    neg_lse = logits.masked_fill(~neg, _OFF).logsumexp(dim=1, keepdim=True)
    per_pos = torch.logaddexp(logits, neg_lse) - logits
    return (per_pos.masked_fill(~pos, 0.0).sum(dim=1) / pos.sum(dim=1)).mean()


def _check_positives(pos: Tensor, what: str) -> None:
    if not bool(pos.any(dim=1).all()):
        raise ValueError(f"{what}: some rows have no positive in the batch; every caption's image must "
                         "be in the batch and every image needs at least one caption")


def _distill_nce(q: Tensor, q_ids: Tensor, keys: Tensor, key_ids: Tensor, own: Tensor | None,
                 queue_keys: Tensor, queue_ids: Tensor, tau: float) -> Tensor:
    """InfoNCE of student queries against batch teacher keys + queue keys.

    ``own`` (intra-modal) marks each query's own teacher row as its only positive; without it
    (cross-modal) every batch key of the query's image is a positive.
    """
    all_keys = torch.cat([keys, queue_keys])
    same = q_ids[:, None] == torch.cat([key_ids, queue_ids])[None, :]
    pos = same.clone()
    pos[:, keys.shape[0]:] = False  # queue rows are older copies: never positives
    if own is not None:
        pos[:, : keys.shape[0]] = own
    _check_positives(pos, "contrastive distillation")
    return _multi_positive_nce(q @ all_keys.T / tau, pos, ~same)


def _max_violation(sim: Tensor, pos: Tensor, neg: Tensor, margin: float) -> Tensor:
    """VSE++ max-violation hinge: for each positive pair, the hardest negative of its row and column."""
    off = sim.masked_fill(~neg, _OFF)
    hardest_row = off.max(dim=1, keepdim=True).values
    hardest_col = off.max(dim=0, keepdim=True).values
    cost = F.relu(margin + hardest_row - sim) + F.relu(margin + hardest_col - sim)
    return cost[pos].mean()


def _kl_rows(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """KL(teacher ‖ student) of the row softmaxes, mean over rows."""
    return F.kl_div(s_logits.log_softmax(dim=1), t_logits.log_softmax(dim=1), log_target=True,
                    reduction="batchmean")


def distill_losses(
    s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, img_ids: Tensor, txt_img_ids: Tensor,
    queue: TeacherQueue | None, cfg: LossConfig,
) -> dict[str, Tensor]:
    """Scalar losses keyed by ``cfg.names()``.

    s_img, t_img: (B, D) student/teacher embeddings of the same images; s_txt, t_txt: (C, D), one row
    per caption; img_ids: (B,) image ids; txt_img_ids: (C,) the image id each caption describes.
    Teacher tensors are detached (gradients reach the student only). ``queue`` holds teacher rows of
    EARLIER batches: read it here, enqueue the current batch after this call.
    """
    B, C = s_img.shape[0], s_txt.shape[0]
    if t_img.shape != s_img.shape or t_txt.shape != s_txt.shape or s_img.shape[1] != s_txt.shape[1]:
        raise ValueError(f"student and teacher shapes differ: s_img {tuple(s_img.shape)}, t_img "
                         f"{tuple(t_img.shape)}, s_txt {tuple(s_txt.shape)}, t_txt {tuple(t_txt.shape)}")
    if img_ids.shape != (B,) or txt_img_ids.shape != (C,):
        raise ValueError(f"expected ({B},) image ids and ({C},) caption ids, got "
                         f"{tuple(img_ids.shape)} and {tuple(txt_img_ids.shape)}")
    with torch.autocast(device_type=s_img.device.type, enabled=False):
        si, st = F.normalize(s_img.float(), dim=-1), F.normalize(s_txt.float(), dim=-1)
        ti, tt = F.normalize(t_img.detach().float(), dim=-1), F.normalize(t_txt.detach().float(), dim=-1)
        img_ids, txt_img_ids = img_ids.to(si.device), txt_img_ids.to(si.device)
        same_it = img_ids[:, None] == txt_img_ids[None, :]  # (B, C): caption j describes image i
        eye_b = torch.eye(B, dtype=torch.bool, device=si.device)
        eye_c = torch.eye(C, dtype=torch.bool, device=si.device)
        out: dict[str, Tensor] = {}

        if cfg.contrastive:
            if queue is not None:
                if queue.dim != si.shape[1]:
                    raise ValueError(f"queue dim {queue.dim} != embedding dim {si.shape[1]}")
                stored = queue.keys()
                qi, qi_ids, qt, qt_ids = (k.to(si.device) for k in stored)
                qi, qt = F.normalize(qi.float(), dim=-1), F.normalize(qt.float(), dim=-1)
            else:
                qi, qt = si.new_zeros(0, si.shape[1]), si.new_zeros(0, si.shape[1])
                qi_ids = qt_ids = img_ids.new_zeros(0)
            tau = cfg.temperature
            out["contrastive"] = (
                _distill_nce(si, img_ids, ti, img_ids, eye_b, qi, qi_ids, tau)
                + _distill_nce(st, txt_img_ids, tt, txt_img_ids, eye_c, qt, qt_ids, tau)
                + _distill_nce(si, img_ids, tt, txt_img_ids, None, qt, qt_ids, tau)
                + _distill_nce(st, txt_img_ids, ti, img_ids, None, qi, qi_ids, tau)
            ) / 4

        if cfg.feature:
            out["feature"] = (F.l1_loss(si, ti) + F.l1_loss(st, tt)) / 2

        if cfg.similarity:
            # 1 − cos(s, t) = ‖s − t‖² / 2 for unit vectors; this form is exactly 0 when s == t.
            out["similarity"] = ((si - ti).pow(2).sum(-1).mean() + (st - tt).pow(2).sum(-1).mean()) / 4

        if cfg.hard_negative:
            # Student x teacher matrices, cross-modal both ways and intra-modal: the positive of an
            # intra-modal row is its own teacher row, other rows of the same image are not negatives.
            same_ii = img_ids[:, None] == img_ids[None, :]
            same_tt = txt_img_ids[:, None] == txt_img_ids[None, :]
            _check_positives(same_it, "hard-negative distillation")
            _check_positives(same_it.T, "hard-negative distillation")
            m = cfg.margin
            out["hard_negative"] = (
                _max_violation(si @ tt.T, same_it, ~same_it, m)
                + _max_violation(st @ ti.T, same_it.T, ~same_it.T, m)
                + _max_violation(si @ ti.T, eye_b, ~same_ii, m)
                + _max_violation(st @ tt.T, eye_c, ~same_tt, m)
            ) / 4

        if cfg.clip:
            _check_positives(same_it, "clip loss")
            _check_positives(same_it.T, "clip loss")
            logits = si @ st.T / cfg.temperature
            out["clip"] = (_multi_positive_nce(logits, same_it, ~same_it)
                           + _multi_positive_nce(logits.T, same_it.T, ~same_it.T)) / 2

        if cfg.affinity:
            ta = cfg.affinity_temperature
            s_logits, t_logits = si @ st.T / ta, ti @ tt.T / ta
            out["affinity"] = (_kl_rows(t_logits, s_logits) + _kl_rows(t_logits.T, s_logits.T)) / 2

    return out
