"""DSMD losses, the teacher queue and the rank collectives, on small hand-made tensors."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from edge_msd.config import build_config
from edge_msd.distill.dist import (
    all_reduce_mean,
    average_batchnorm_stats,
    gather_across_ranks,
    sync_batchnorm,
)
from edge_msd.distill.losses import LOSS_NAMES, LossConfig, _max_violation, distill_losses
from edge_msd.distill.queue import TeacherQueue
from edge_msd.errors import ConfigError

ALL = LossConfig(clip=True, affinity=True)


def only(*names: str, **kw) -> LossConfig:
    return LossConfig(**{n: n in names for n in LOSS_NAMES}, **kw)


def random_batch(seed: int = 0, B: int = 4, D: int = 8):
    """B images; image 0 and image 2 have two captions each, the others one."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.arange(B) * 10
    txt_img_ids = torch.tensor([0, 0, 10, 20, 20, 30][: B + 2])
    t_img, t_txt = torch.randn(B, D, generator=g), torch.randn(len(txt_img_ids), D, generator=g)
    s_img = t_img + 0.8 * torch.randn(B, D, generator=g)
    s_txt = t_txt + 0.8 * torch.randn(len(txt_img_ids), D, generator=g)
    return s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids


def orthonormal_teacher(B: int = 3, D: int = 6):
    """Teacher images on distinct axes; each caption's teacher text equals its image's vector."""
    img_ids = torch.arange(B)
    txt_img_ids = torch.tensor([0, 0, 1, 2])
    t_img = torch.eye(D)[:B]
    return t_img, t_img[txt_img_ids].clone(), img_ids, txt_img_ids


# ---- config ------------------------------------------------------------------------------------

def test_config_names_and_validation():
    assert LossConfig().names() == ["contrastive", "feature", "similarity", "hard_negative"]
    assert ALL.names() == list(LOSS_NAMES)
    assert build_config(LossConfig, {"clip": True, "feature": False}).names() == [
        "contrastive", "similarity", "hard_negative", "clip"]
    for bad in ({"temperature": 0.0}, {"affinity_temperature": -1.0}, {"margin": -0.1},
                {"temperature": float("nan")}, {n: False for n in LOSS_NAMES}):
        with pytest.raises(ConfigError):
            build_config(LossConfig, bad)


# ---- known values ------------------------------------------------------------------------------

def test_feature_and_similarity_known_values():
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    ids = torch.tensor([0])
    # Student image orthogonal to its teacher (scaled: inputs are normalised), student text equal.
    out = distill_losses(3 * e0, e0, e1, e0, ids, ids, None, only("feature", "similarity"))
    assert set(out) == {"feature", "similarity"}
    assert out["feature"].item() == pytest.approx((1.0 + 0.0) / 2)  # L1 mean (|1-0| + |0-1|) / 2 on images
    assert out["similarity"].item() == pytest.approx((1.0 + 0.0) / 2)  # 1 - cos = 1 on images, 0 on text


def test_contrastive_known_value_with_queue():
    t_img, t_txt, img_ids, txt_img_ids = orthonormal_teacher()
    cfg = only("contrastive", temperature=0.5)
    # Student == teacher, one caption per image: each of the 4 terms has logit 2 for its positive
    # and 0 for each of the other 2 images.
    one = torch.tensor([0, 2, 3])
    out = distill_losses(t_img, t_txt[one], t_img, t_txt[one], img_ids, txt_img_ids[one], None, cfg)
    assert out["contrastive"].item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-5)
    # Queue: two rows of other images (logit 0 for everyone) and an older copy of image 0 (id 0),
    # a negative of logit 0 for images 1 and 2, left out for image 0 (where its logit would be 2).
    queue = TeacherQueue(8, 6)
    rows, ids = torch.eye(6)[[4, 5, 0]], torch.tensor([7, 8, 0])
    queue.enqueue(rows, rows, ids, ids)
    out = distill_losses(t_img, t_txt[one], t_img, t_txt[one], img_ids, txt_img_ids[one], queue, cfg)
    expected = (math.log(1 + 4 * math.exp(-2)) + 2 * math.log(1 + 5 * math.exp(-2))) / 3
    assert out["contrastive"].item() == pytest.approx(expected, rel=1e-5)


def test_max_violation_takes_hardest_negative_of_row_and_column():
    sim = torch.tensor([[0.9, 0.8, 0.3], [0.1, 0.5, 0.2], [0.0, 0.1, 0.7]])
    pos = torch.eye(3, dtype=torch.bool)
    # (0,0): row hardest 0.8 -> 0.1, column hardest 0.1 -> 0;  (1,1): row 0.2 -> 0, column 0.8 -> 0.5;
    # (2,2): row 0.1 -> 0, column 0.3 -> 0.
    assert _max_violation(sim, pos, ~pos, 0.2).item() == pytest.approx(0.6 / 3)
    easier = sim.clone()
    easier[0, 2] = 0.4  # still easier than 0.8 in row 0 and under (2,2)'s threshold 0.5: no change
    assert _max_violation(easier, pos, ~pos, 0.2).item() == pytest.approx(0.6 / 3)
    harder = sim.clone()
    harder[0, 1] = 0.85  # the hardest negative of row 0 and of column 1 moves by 0.05
    assert _max_violation(harder, pos, ~pos, 0.2).item() == pytest.approx(0.7 / 3)


def reference_hard_negative(s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids, margin):
    """Loop version of the 4-matrix max-violation loss, to check the vectorised one."""
    si, st, ti, tt = (F.normalize(x, dim=-1) for x in (s_img, s_txt, t_img, t_txt))

    def one(q, k, q_ids, k_ids, own: bool):
        sim, costs = q @ k.T, []
        for i in range(len(q)):
            for j in range(len(k)):
                if (own and i != j) or (not own and q_ids[i] != k_ids[j]):
                    continue
                row = max(sim[i, c] for c in range(len(k)) if k_ids[c] != q_ids[i])
                col = max(sim[r, j] for r in range(len(q)) if q_ids[r] != k_ids[j])
                costs.append(max(0, margin + row - sim[i, j]) + max(0, margin + col - sim[i, j]))
        return sum(costs) / len(costs)

    return (one(si, tt, img_ids, txt_img_ids, False) + one(st, ti, txt_img_ids, img_ids, False)
            + one(si, ti, img_ids, img_ids, True) + one(st, tt, txt_img_ids, txt_img_ids, True)) / 4


def test_hard_negative_matches_loop_reference():
    batch = random_batch(3)
    out = distill_losses(*batch, None, only("hard_negative", margin=0.3))
    assert out["hard_negative"].item() == pytest.approx(float(reference_hard_negative(*batch, 0.3)), rel=1e-5)


# ---- behaviour ---------------------------------------------------------------------------------

def test_losses_vanish_or_are_lowest_when_student_equals_teacher():
    t_img, t_txt, img_ids, txt_img_ids = orthonormal_teacher()
    same = distill_losses(t_img.clone(), t_txt.clone(), t_img, t_txt, img_ids, txt_img_ids, None, ALL)
    for name in ("feature", "similarity", "hard_negative", "affinity"):
        assert same[name].item() == 0.0, name
    g = torch.Generator().manual_seed(1)
    s_img = t_img + 0.5 * torch.randn(t_img.shape, generator=g)
    s_txt = t_txt + 0.5 * torch.randn(t_txt.shape, generator=g)
    other = distill_losses(s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids, None, ALL)
    for name in LOSS_NAMES:
        assert other[name].item() > 0, name
    assert same["contrastive"] < other["contrastive"]
    assert same["clip"] < other["clip"]


def test_gradients_reach_the_student_only():
    s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids = random_batch(2)
    for t in (s_img, s_txt, t_img, t_txt):
        t.requires_grad_(True)
    queue = TeacherQueue(16, 8)
    queue.enqueue(torch.randn(4, 8), torch.randn(6, 8), torch.arange(4) + 100, torch.arange(6) + 100)
    out = distill_losses(s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids, queue, ALL)
    for name, loss in out.items():
        g_img, g_txt = torch.autograd.grad(loss, [s_img, s_txt], retain_graph=True)
        assert torch.isfinite(g_img).all() and torch.isfinite(g_txt).all(), name
        assert g_img.abs().sum() > 0 and g_txt.abs().sum() > 0, name
    sum(out.values()).backward()
    assert t_img.grad is None and t_txt.grad is None
    assert not queue.image.requires_grad


def reference_contrastive(s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids, queue, tau):
    """Loop version of the masked multi-positive contrastive distillation loss."""
    si, st, ti, tt = (F.normalize(x, dim=-1) for x in (s_img, s_txt, t_img, t_txt))
    qi, qi_ids, qt, qt_ids = queue.keys()
    qi, qt = F.normalize(qi, dim=-1), F.normalize(qt, dim=-1)

    def one(q, q_ids, k, k_ids, qk, qk_ids, own: bool):
        keys, ids = torch.cat([k, qk]), torch.cat([k_ids, qk_ids]).tolist()
        terms = []
        for i in range(len(q)):
            logits = (keys @ q[i] / tau).tolist()
            positives = [j for j in range(len(k)) if (j == i if own else ids[j] == q_ids[i])]
            negatives = sum(math.exp(logits[j]) for j in range(len(keys)) if ids[j] != q_ids[i])
            terms.append(sum(-math.log(math.exp(logits[p]) / (math.exp(logits[p]) + negatives))
                             for p in positives) / len(positives))
        return sum(terms) / len(terms)

    return (one(si, img_ids, ti, img_ids, qi, qi_ids, True)
            + one(st, txt_img_ids, tt, txt_img_ids, qt, qt_ids, True)
            + one(si, img_ids, tt, txt_img_ids, qt, qt_ids, False)
            + one(st, txt_img_ids, ti, img_ids, qi, qi_ids, False)) / 4


def test_contrastive_matches_loop_reference_with_duplicate_captions_and_queued_copies():
    batch = random_batch(8)
    g = torch.Generator().manual_seed(9)
    queue = TeacherQueue(32, 8)
    # Other images, then older copies of batch images 0 and 20 (ids shared with the batch).
    queue.enqueue(torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.arange(5) + 100,
                  torch.arange(5) + 100)
    queue.enqueue(torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g), torch.tensor([0, 20]),
                  torch.tensor([0, 0, 20]))
    out = distill_losses(*batch, queue, only("contrastive", temperature=0.2))
    expected = reference_contrastive(*batch, queue, 0.2)
    assert out["contrastive"].item() == pytest.approx(expected, rel=1e-5)


def test_same_image_rows_are_never_negatives_in_the_batch():
    """One (image, caption) pair per row, as a sample-per-caption loader yields them: the batch
    holds every image twice. With the true image ids the copies are not negatives; under new ids
    (what the public code does) each copy is a negative as similar as the positive: losses rise.
    """
    s_img, s_txt, t_img, t_txt = (x[:3] for x in random_batch(4, B=3)[:4])
    rep = [x.repeat(2, 1) for x in (s_img, s_txt, t_img, t_txt)]
    cfg = only("contrastive", "hard_negative", "clip")
    ids = torch.arange(3).repeat(2)
    proper = distill_losses(*rep, ids, ids, None, cfg)
    naive = distill_losses(*rep, torch.arange(6), torch.arange(6), None, cfg)
    for name in cfg.names():
        assert naive[name].item() > proper[name].item() + 1e-3, name
    expected = float(reference_hard_negative(*rep, ids, ids, 0.2))
    assert proper["hard_negative"].item() == pytest.approx(expected, rel=1e-5)


def one_image_two_captions(seed: int):
    """One image with two captions in the batch; other images only in the queue."""
    g = torch.Generator().manual_seed(seed)
    t_img, t_cap = torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)
    s_img, s_cap = t_img + torch.randn(1, 8, generator=g), t_cap + torch.randn(1, 8, generator=g)
    queue = TeacherQueue(16, 8)
    queue.enqueue(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.arange(4) + 1,
                  torch.arange(4) + 1)
    return s_img, s_cap, t_img, t_cap, queue, g


def test_an_identical_second_caption_changes_nothing():
    """Two identical captions of one image give the loss of one: they are both positives of the
    image and never each other's negative (were they, the duplicate's logit would equal the
    positive's and raise the loss)."""
    s_img, s_cap, t_img, t_cap, queue, _ = one_image_two_captions(5)
    ids = torch.tensor([0])
    one = distill_losses(s_img, s_cap, t_img, t_cap, ids, ids, queue, only("contrastive"))
    two = distill_losses(s_img, s_cap.repeat(2, 1), t_img, t_cap.repeat(2, 1), ids, torch.tensor([0, 0]),
                         queue, only("contrastive"))
    assert two["contrastive"].item() == pytest.approx(one["contrastive"].item(), rel=1e-6)


def test_queued_copies_of_the_batch_image_are_not_negatives():
    s_img, s_cap, t_img, t_cap, queue, g = one_image_two_captions(6)
    s_txt, t_txt = torch.cat([s_cap, s_cap + 0.3]), torch.cat([t_cap, t_cap + 0.3])
    old_img, old_txt = torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)  # earlier epoch

    def loss(old_id: int | None) -> float:
        q = TeacherQueue(16, 8)
        q.load_state_dict(queue.state_dict())
        if old_id is not None:
            q.enqueue(old_img, old_txt, torch.full((2,), old_id), torch.full((3,), old_id))
        ids = torch.tensor([0])
        return distill_losses(s_img, s_txt, t_img, t_txt, ids, torch.tensor([0, 0]), q, only("contrastive"))[
            "contrastive"].item()

    clean = loss(None)
    assert loss(0) == pytest.approx(clean, rel=1e-6)
    assert loss(1000) > clean + 1e-3  # the same rows from another image are genuine negatives


def test_bad_inputs_raise():
    s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids = random_batch(0)
    with pytest.raises(ValueError, match="shapes differ"):
        distill_losses(s_img[:, :4], s_txt, t_img, t_txt, img_ids, txt_img_ids, None, ALL)
    with pytest.raises(ValueError, match="ids"):
        distill_losses(s_img, s_txt, t_img, t_txt, img_ids[:2], txt_img_ids, None, ALL)
    orphan = txt_img_ids.clone()
    orphan[-1] = 999  # a caption whose image is not in the batch has no positive
    with pytest.raises(ValueError, match="no positive"):
        distill_losses(s_img, s_txt, t_img, t_txt, img_ids, orphan, None, only("contrastive"))
    with pytest.raises(ValueError, match="queue dim"):
        distill_losses(s_img, s_txt, t_img, t_txt, img_ids, txt_img_ids, TeacherQueue(8, 4), ALL)


def test_losses_are_float32_under_bf16_autocast():
    batch = random_batch(1)
    ref = distill_losses(*batch, None, ALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in batch]
        out = distill_losses(*half, None, ALL)
    for name in LOSS_NAMES:
        assert out[name].dtype == torch.float32
        assert out[name].item() == pytest.approx(ref[name].item(), rel=0.05, abs=1e-3), name


# ---- queue -------------------------------------------------------------------------------------

def test_queue_fifo_wraparound_and_independent_pointers():
    q = TeacherQueue(5, 2)
    img, _, txt, _ = q.keys()
    assert img.shape == (0, 2) and txt.shape == (0, 2)
    for step in range(3):  # 2 images and 3 captions per batch; rows carry their global index
        i = torch.arange(2) + 2 * step
        t = torch.arange(3) + 3 * step
        q.enqueue(i[:, None].float().expand(2, 2), t[:, None].float().expand(3, 2), i, t)
        if step == 0:
            assert q.keys()[1].tolist() == [0, 1] and q.keys()[3].tolist() == [0, 1, 2]
    img, img_ids, txt, txt_ids = q.keys()
    assert img_ids.tolist() == [5, 1, 2, 3, 4]  # row 5 overwrote slot 0, the oldest
    assert txt_ids.tolist() == [5, 6, 7, 8, 4]  # 9 captions into 5 slots: slots 0-3 hold the newest
    assert torch.equal(img[:, 0], img_ids.float()) and torch.equal(txt[:, 0], txt_ids.float())
    assert q.image_ptr.item() == 1 and q.text_ptr.item() == 4


def test_queue_state_dict_roundtrip_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g), torch.arange(3) + 3 * k,
                torch.arange(4) + 4 * k) for k in range(5)]
    a = TeacherQueue(7, 4)
    for b in batches[:3]:
        a.enqueue(*b)
    b_ = TeacherQueue(7, 4)
    b_.load_state_dict(a.state_dict())
    for b in batches[3:]:
        a.enqueue(*b)
        b_.enqueue(*b)
    for x, y in zip(a.keys(), b_.keys(), strict=True):
        assert torch.equal(x, y)
    assert set(a.state_dict()) == {"image", "text", "image_ids", "text_ids", "image_ptr", "text_ptr"}


def test_queue_rejects_batches_it_cannot_take_and_stays_unchanged():
    q = TeacherQueue(4, 2)
    with pytest.raises(ConfigError, match="queue size 4 cannot take a batch of 5"):
        q.enqueue(torch.zeros(2, 2), torch.zeros(5, 2), torch.arange(2), torch.arange(5))
    assert q.image_ptr.item() == 0 and q.keys()[0].shape[0] == 0  # images not half-written
    with pytest.raises(ValueError, match=">= 0"):
        q.enqueue(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ConfigError):
        TeacherQueue(0, 2)


# ---- collectives -------------------------------------------------------------------------------

def test_collectives_are_no_ops_without_a_process_group():
    t = torch.arange(6.0).reshape(3, 2)
    assert gather_across_ranks(t) is t
    assert torch.equal(all_reduce_mean(t), t)
    bn = nn.BatchNorm1d(2)
    assert sync_batchnorm(bn, torch.device("cpu")) is bn


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.full((2 + rank, 3), float(rank))  # ranks hold different row counts
        bn = nn.Sequential(nn.BatchNorm1d(2))
        bn[0].running_mean.fill_(float(rank))
        bn[0].running_var.fill_(1.0 + 2 * rank)
        average_batchnorm_stats(bn)
        torch.save((gather_across_ranks(rows), all_reduce_mean(torch.tensor([float(rank)])),
                    bn[0].running_mean, bn[0].running_var), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_across_two_ranks_with_unequal_rows(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork, not spawn: the workers need nothing but torch, and re-importing it costs seconds.
    mp.start_processes(_gather_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    expected = torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 3)
    for rank in (0, 1):
        gathered, mean, bn_mean, bn_var = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(gathered, expected)
        assert mean.item() == 0.5
        # BatchNorm running statistics end equal on both ranks: the mean of theirs.
        assert torch.equal(bn_mean, torch.full((2,), 0.5)) and torch.equal(bn_var, torch.full((2,), 2.0))
