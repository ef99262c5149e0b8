import numpy as np
import pytest

from edge_msd.eval import retrieval_metrics, zero_shot_accuracy
from edge_msd.eval.retrieval import first_images, subset_metrics


def test_perfect_and_multi_caption_recall():
    img = np.eye(4, dtype=np.float32)
    # two captions per image; the second caption of image 3 points at image 0
    cap_img = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    txt = img[[0, 0, 1, 1, 2, 2, 3, 0]]
    m = retrieval_metrics(img, txt, cap_img)
    assert m["i2t"]["R@1"] == 100.0  # image 3 still finds its first caption
    assert m["t2i"]["R@1"] == pytest.approx(100 * 7 / 8)
    assert m["t2i"]["R@5"] == 100.0
    assert m["rsum"] == pytest.approx(sum(m["i2t"].values()) + sum(m["t2i"].values()))


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(500, 32))
    txt = rng.normal(size=(500, 32))
    m = retrieval_metrics(img, txt, np.arange(500))
    assert m["i2t"]["R@1"] < 2.0 and m["t2i"]["R@10"] < 6.0


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(np.eye(3), np.eye(3), np.arange(2))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.eye(3), np.eye(3), np.array([0, 1, 5]))


def test_zero_shot():
    assert zero_shot_accuracy(np.eye(3), np.eye(3), np.array([0, 1, 1])) == pytest.approx(200 / 3)


def test_subset_metrics_equal_the_metrics_of_the_subset_alone():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((6, 8)), rng.standard_normal((9, 8))
    cap = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
    mask = np.array([True, False, True, False, True, True])
    got = subset_metrics(img, txt, cap, mask)
    # images 0, 2, 4, 5 → rows 0..3; their captions 0, 1, 3, 6, 7, 8
    want = retrieval_metrics(img[[0, 2, 4, 5]], txt[[0, 1, 3, 6, 7, 8]], np.array([0, 0, 1, 2, 3, 3]))
    assert got == want and got["n_images"] == 4 and got["n_texts"] == 6


def test_first_images_and_their_captions():
    cap = np.array([0, 1, 2, 0, 1, 3])
    n, caps = first_images(cap, 4, 2)
    assert n == 2 and caps.tolist() == [0, 1, 3, 4]
    assert first_images(cap, 4, 0)[0] == 4 and first_images(cap, 4, 9)[1].tolist() == list(range(6))
