"""Datasets: every format read from small fixture files written here, and every bad input."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edge_msd.cli import main
from edge_msd.data import open_dataset
from edge_msd.data.scenes import HELD_OUT
from edge_msd.data.spec import parse_spec
from edge_msd.data.summary import summarize
from edge_msd.data.wds import expand_braces
from edge_msd.errors import BadSampleError, ConfigError, DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, colour: tuple[int, int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, fmt))


def mean_colour(img: Image.Image) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return tuple(int(round(v)) for v in np.asarray(img, dtype=np.float64).mean(axis=(0, 1)))


def close(c1: tuple[int, ...], c2: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(c1, c2, strict=True))


# ---- spec parsing ---------------------------------------------------------------------------


def test_parse_spec_splits_kind_path_and_options():
    s = parse_spec("wds:/data/{000000..000009}.tar?a=1&b=x")
    assert (s.kind, s.path, s.options) == ("wds", "/data/{000000..000009}.tar", {"a": "1", "b": "x"})
    assert parse_spec("demo-scenes").path is None
    with pytest.raises(ConfigError, match="given twice"):
        parse_spec("demo-scenes?seed=1&seed=2")
    with pytest.raises(ConfigError, match="expected key=value after '\\?', got 'seed'"):
        parse_spec("demo-scenes?seed")
    assert parse_spec("csv:/a.csv?root=/x+y%26z").options == {"root": "/x+y&z"}


def test_unknown_kind_lists_kinds():
    with pytest.raises(ConfigError, match=r"unknown kind 'imagenet'.*demo-scenes.*csv.*coco.*flickr30k.*wds"):
        open_dataset("imagenet:/x")


def test_unknown_or_mistyped_option_is_named():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) n_trian; demo-scenes takes: .*n_train"):
        open_dataset("demo-scenes?n_trian=5")
    with pytest.raises(ConfigError, match="option 'seed': expected an integer, got 'x'"):
        open_dataset("demo-scenes?seed=x")


# ---- demo-scenes ------------------------------------------------------------------------------

SMALL = "demo-scenes?n_train=300&n_val=60&n_test=200"


def test_demo_scenes_counts_and_multi_captions():
    ds = open_dataset(SMALL + "&captions_per_image=3", "train")
    assert (ds.n_images, ds.n_captions) == (300, 900)
    assert np.array_equal(np.bincount(ds.caption_image_index), np.full(300, 3))
    assert len(set(ds.captions)) == 900  # every caption names every attribute: unique per image
    img = ds.load_image(5)
    assert img.size == (96, 96) and img.mode == "RGB"
    assert open_dataset(SMALL + "&size=32", "val").load_image(0).size == (32, 32)


def test_demo_scenes_are_deterministic_by_seed_and_index():
    a, b = open_dataset(SMALL, "test"), open_dataset(SMALL, "test")
    assert a.captions == b.captions and a.fingerprint() == b.fingerprint()
    for i in (0, 7, 199):
        assert np.array_equal(np.asarray(a.load_image(i)), np.asarray(b.load_image(i)))
    c = open_dataset(SMALL + "&seed=1", "test")
    assert c.captions != a.captions
    # the test split does not move when the training split grows
    d = open_dataset("demo-scenes?n_train=900&n_val=60&n_test=200", "test")
    assert d.captions == a.captions


def test_demo_scenes_hold_out_colour_shape_pairs_for_test_only():
    for split in ("train", "val"):
        ds = open_dataset(SMALL, split)
        pairs = {(o.colour, o.shape) for s in ds.scenes for o in s.objects}
        assert not pairs & HELD_OUT and not ds.held_out.any()
    test = open_dataset(SMALL, "test")
    assert 0.4 <= test.held_out.mean() <= 0.6
    for i in np.flatnonzero(test.held_out)[:20]:
        held = [o for o in test.scenes[i].objects if (o.colour, o.shape) in HELD_OUT]
        assert held and all(
            f"{o.colour} {o.shape}" in c
            for o in held
            for c in [test.captions[j] for j in test.captions_of(i)]
        )


def test_demo_scenes_are_unique_across_splits_and_captions_match_scenes():
    keys = [s.key() for split in ("train", "val", "test") for s in open_dataset(SMALL, split).scenes]
    assert len(set(keys)) == len(keys)
    ds = open_dataset(SMALL, "train")
    for i in range(40):
        scene = ds.scenes[i]
        for j in ds.captions_of(i):
            for o in scene.objects:
                assert f"{o.colour} {o.shape}" in ds.captions[j]
        if scene.where == "left of":
            assert scene.objects[0].x < scene.objects[1].x
        if scene.where == "above":
            assert scene.objects[0].y < scene.objects[1].y


def test_demo_scene_image_shows_its_objects_in_place():
    ds = open_dataset(SMALL + "&size=64", "train")
    from edge_msd.data.scenes import COLOURS

    for i in range(20):
        arr = np.asarray(ds.load_image(i)).astype(int)
        for o in ds.scenes[i].objects:
            px = arr[int(o.y * 64), int(o.x * 64)]  # the centre of each shape has the shape's colour
            assert np.abs(px - np.array(COLOURS[o.colour])).max() <= 12


def test_demo_scene_counterfactuals_change_one_attribute():
    ds = open_dataset(SMALL, "train")
    two = next(i for i, s in enumerate(ds.scenes) if len(s.objects) == 2)
    cf = ds.counterfactuals(two)
    assert set(cf) == {"original", "relation", "colour", "shape", "size"}
    assert len(set(cf.values())) == 5
    assert sorted(cf["relation"].split()) == sorted(cf["original"].split())  # same words, other order


def test_demo_scene_option_errors():
    with pytest.raises(ConfigError, match="captions_per_image': expected 1..4"):
        open_dataset("demo-scenes?captions_per_image=9")
    with pytest.raises(ConfigError, match="'n_train': expected a non-negative integer"):
        open_dataset("demo-scenes?n_train=-1")
    with pytest.raises(ConfigError, match="unknown split 'dev'; valid splits: train, val, test"):
        open_dataset(SMALL, "dev")


# ---- CSV / TSV --------------------------------------------------------------------------------


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    write_image(tmp_path / "img" / "a.png", RED)
    write_image(tmp_path / "img" / "b.jpg", BLUE, "JPEG")
    return tmp_path


def test_csv_groups_captions_by_image(csv_dir: Path):
    (csv_dir / "pairs.csv").write_text(
        'filepath,title\nimg/a.png,a red square\nimg/b.jpg,"a blue, square"\nimg/a.png,red again\n'
    )
    ds = open_dataset(f"csv:{csv_dir / 'pairs.csv'}")
    assert ds.image_keys == ["img/a.png", "img/b.jpg"]
    assert ds.captions == ["a red square", "red again", "a blue, square"]
    assert ds.caption_image_index.tolist() == [0, 0, 1]
    assert close(mean_colour(ds.load_image(0)), RED) and close(mean_colour(ds.load_image(1)), BLUE)


def test_tsv_with_other_columns_and_split_column(csv_dir: Path):
    (csv_dir / "pairs.tsv").write_text(
        "path\tcap\tsplit\nimg/a.png\tred one\ttrain\nimg/b.jpg\tblue one\tval\n", encoding="utf-8"
    )
    spec = f"csv:{csv_dir / 'pairs.tsv'}?img_key=path&caption_key=cap"
    assert open_dataset(spec, "val").captions == ["blue one"]
    assert open_dataset(spec, "train").captions == ["red one"]
    with pytest.raises(ConfigError, match="unknown split 'test'; valid splits: train, val"):
        open_dataset(spec, "test")


def test_csv_split_placeholder_and_root(csv_dir: Path):
    (csv_dir / "lists").mkdir()
    (csv_dir / "lists" / "val.csv").write_text("filepath,title\nimg/b.jpg,blue\n")
    ds = open_dataset(f"csv:{csv_dir / 'lists' / '{split}.csv'}?root={csv_dir}", "val")
    assert ds.captions == ["blue"] and close(mean_colour(ds.load_image(0)), BLUE)


def test_csv_missing_column_lists_columns(csv_dir: Path):
    (csv_dir / "p.csv").write_text("image,text\nimg/a.png,red\n")
    with pytest.raises(
        DataError,
        match=r"p.csv:1: missing column 'filepath' \(option img_key\); "
        r"columns found: 'image', 'text'",
    ):
        open_dataset(f"csv:{csv_dir / 'p.csv'}")


def test_csv_empty_caption_names_line(csv_dir: Path):
    (csv_dir / "p.csv").write_text("filepath,title\nimg/a.png,red\nimg/b.jpg,   \n")
    with pytest.raises(DataError, match=r"p.csv:3: column 'title': empty caption"):
        open_dataset(f"csv:{csv_dir / 'p.csv'}")
    ds = open_dataset(f"csv:{csv_dir / 'p.csv'}", skip_bad=True)
    assert ds.image_keys == ["img/a.png"] and len(ds.skipped) == 2  # the caption, then its captionless image


def test_csv_non_utf8_names_line(csv_dir: Path):
    (csv_dir / "p.csv").write_bytes(b"filepath,title\nimg/a.png,red\nimg/b.jpg,caf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"p.csv:3: not valid UTF-8 \(byte 0xe9\)"):
        open_dataset(f"csv:{csv_dir / 'p.csv'}")
    ds = open_dataset(f"csv:{csv_dir / 'p.csv'}", skip_bad=True)
    assert ds.captions == ["red"] and "not valid UTF-8" in ds.skipped[0]["reason"]


def test_csv_missing_image_names_file_and_line_or_is_skipped(csv_dir: Path):
    (csv_dir / "p.csv").write_text("filepath,title\nimg/a.png,red\nimg/gone.png,lost\n")
    with pytest.raises(DataError, match=r"p.csv:3: image file not found: .*img/gone.png"):
        open_dataset(f"csv:{csv_dir / 'p.csv'}")
    ds = open_dataset(f"csv:{csv_dir / 'p.csv'}", skip_bad=True)
    assert ds.image_keys == ["img/a.png"]
    assert ds.skipped == [
        {"key": "img/gone.png", "where": f"{csv_dir / 'p.csv'}:3", "reason": ds.skipped[0]["reason"]}
    ]


def test_corrupt_and_truncated_images_raise_bad_sample(csv_dir: Path):
    (csv_dir / "img" / "junk.png").write_bytes(b"not an image at all")
    full = image_bytes(GREEN, "JPEG", size=64)
    (csv_dir / "img" / "cut.jpg").write_bytes(full[: len(full) // 2])
    (csv_dir / "p.csv").write_text("filepath,title\nimg/a.png,ok\nimg/junk.png,junk\nimg/cut.jpg,cut\n")
    ds = open_dataset(f"csv:{csv_dir / 'p.csv'}")
    ds.load_image(0)
    for i, name in ((1, "junk.png"), (2, "cut.jpg")):
        with pytest.raises(BadSampleError, match=f"{name}: cannot decode image") as e:
            ds.load_image(i)
        assert e.value.image_index == i


def test_csv_image_paths_outside_the_root_are_refused_unless_allowed(tmp_path: Path):
    write_image(tmp_path / "secret.png", GREEN)
    ds_dir = tmp_path / "ds"
    write_image(ds_dir / "img" / "a.png", RED)
    (ds_dir / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    escapes = ["../secret.png", str(tmp_path / "secret.png"), "img/link.png", "img/../../secret.png"]
    for rel in escapes:
        (ds_dir / "p.csv").write_text(f"filepath,title\nimg/a.png,red\n{rel},hidden\n")
        spec = f"csv:{ds_dir / 'p.csv'}"
        refused = f"p.csv:3: image path '{rel}' leads outside the dataset root {ds_dir}; "
        with pytest.raises(DataError, match=re.escape(refused) + ".*allow_outside_root=1"):
            open_dataset(spec)
        skipped = open_dataset(spec, skip_bad=True)
        assert skipped.image_keys == ["img/a.png"] and "outside" in skipped.skipped[0]["reason"]
        allowed = open_dataset(spec + "?allow_outside_root=1")
        assert allowed.image_keys == ["img/a.png", rel] and close(mean_colour(allowed.load_image(1)), GREEN)
    (ds_dir / "p.csv").write_text("filepath,title\nimg/./a.png,red\n")
    assert open_dataset(f"csv:{ds_dir / 'p.csv'}").n_images == 1  # inside, however spelled


# ---- Karpathy JSON ------------------------------------------------------------------------------


def _karpathy(tmp: Path, kind: str) -> Path:
    images = []
    for k, (split, colour) in enumerate([("train", RED), ("restval", GREEN), ("val", BLUE), ("test", RED)]):
        entry = {
            "filename": f"im{k}.jpg",
            "split": split,
            "imgid": k,
            "sentences": [{"raw": f"caption {k} a", "tokens": []}, {"raw": f"caption {k} b"}],
        }
        if kind == "coco":
            entry["filepath"] = "val2014" if split != "train" else "train2014"
        images.append(entry)
        write_image(tmp / entry.get("filepath", "") / entry["filename"], colour, "JPEG")
    path = tmp / f"dataset_{kind}.json"
    path.write_text(json.dumps({"images": images, "dataset": kind}))
    return path


def test_coco_karpathy_splits_and_filepath(tmp_path: Path):
    path = _karpathy(tmp_path, "coco")
    train = open_dataset(f"coco:{path}", "train")
    assert train.image_keys == ["train2014/im0.jpg", "val2014/im1.jpg"]  # train + restval
    assert train.captions == ["caption 0 a", "caption 0 b", "caption 1 a", "caption 1 b"]
    assert close(mean_colour(train.load_image(1)), GREEN)
    test = open_dataset(f"coco:{path}", "test")
    assert test.image_keys == ["val2014/im3.jpg"] and test.n_captions == 2


def test_flickr30k_karpathy_with_root(tmp_path: Path):
    path = _karpathy(tmp_path / "imgs", "flickr30k")
    moved = tmp_path / "meta" / path.name
    moved.parent.mkdir()
    path.rename(moved)
    val = open_dataset(f"flickr30k:{moved}?root={tmp_path / 'imgs'}", "val")
    assert val.image_keys == ["im2.jpg"] and close(mean_colour(val.load_image(0)), BLUE)
    with pytest.raises(DataError, match=r"images\[0\]\.filename: image file not found"):
        open_dataset(f"flickr30k:{moved}", "train")  # default root: the JSON's folder, no images there


def test_karpathy_image_paths_outside_the_root_are_refused_unless_allowed(tmp_path: Path):
    path = _karpathy(tmp_path / "coco", "coco")
    write_image(tmp_path / "secret.jpg", GREEN, "JPEG")
    doc = json.loads(path.read_text())
    doc["images"][3].update(filepath="..", filename="secret.jpg")
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"images\[3\]\.filename: image path '\.\./secret.jpg' leads outside"):
        open_dataset(f"coco:{path}", "test")
    ds = open_dataset(f"coco:{path}?allow_outside_root=true", "test")
    assert ds.image_keys == ["../secret.jpg"] and close(mean_colour(ds.load_image(0)), GREEN)


def test_karpathy_wrong_shape_names_field(tmp_path: Path):
    path = _karpathy(tmp_path, "coco")
    doc = json.loads(path.read_text())
    doc["images"][3]["sentences"] = "a caption"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"images\[3\]\.sentences: expected a list, got str"):
        open_dataset(f"coco:{path}", "train")
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match="expected a list under the key 'images'"):
        open_dataset(f"coco:{path}", "train")
    path.write_bytes(b'{"images":\n [{"filename": "caf\xe9.jpg"}]}')
    with pytest.raises(DataError, match=r"dataset_coco.json:2: not valid UTF-8 \(byte 0xe9\)"):
        open_dataset(f"coco:{path}", "train")
    path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"dataset_coco.json:1: not valid JSON"):
        open_dataset(f"coco:{path}", "train")


def test_karpathy_empty_caption_and_unknown_split(tmp_path: Path):
    path = _karpathy(tmp_path, "flickr30k")
    doc = json.loads(path.read_text())
    doc["images"][2]["sentences"][1]["raw"] = ""
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"images\[2\]\.sentences\[1\]\.raw: empty caption"):
        open_dataset(f"flickr30k:{path}", "val")
    assert open_dataset(f"flickr30k:{path}", "val", skip_bad=True).captions == ["caption 2 a"]
    with pytest.raises(ConfigError, match="unknown split 'restval'; valid splits: train, val, test"):
        open_dataset(f"flickr30k:{path}", "restval")


# ---- webdataset shards ------------------------------------------------------------------------


def _shard(path: Path, samples: list[tuple[str, bytes | None, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, img, txt in samples:
            for ext, data in (("jpg", img), ("txt", txt)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_expand_braces():
    assert expand_braces("/d/{000..002}.tar") == ["/d/000.tar", "/d/001.tar", "/d/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    with pytest.raises(ConfigError, match="runs backwards"):
        expand_braces("{5..1}")


def test_wds_random_access_across_shards(tmp_path: Path):
    _shard(
        tmp_path / "000000.tar",
        [("s0", image_bytes(RED, "JPEG"), b"a red one"), ("s1", image_bytes(GREEN), b"a green one\n")],
    )
    _shard(tmp_path / "000001.tar", [("dir/s2", image_bytes(BLUE, "JPEG"), "bl\u00e5 one".encode())])
    ds = open_dataset(f"wds:{tmp_path}/{{000000..000001}}.tar", "train")
    assert ds.image_keys == ["000000.tar/s0", "000000.tar/s1", "000001.tar/dir/s2"]
    assert ds.captions == ["a red one", "a green one", "bl\u00e5 one"]
    for i, colour in [(2, BLUE), (0, RED), (1, GREEN)]:  # any order: random access
        assert close(mean_colour(ds.load_image(i)), colour)


def test_wds_bad_samples(tmp_path: Path):
    _shard(
        tmp_path / "a.tar",
        [
            ("ok", image_bytes(RED), b"fine"),
            ("nocap", image_bytes(RED), None),
            ("empty", image_bytes(RED), b"  "),
            ("latin", image_bytes(RED), b"caf\xe9"),
        ],
    )
    with pytest.raises(DataError, match=r"a.tar: sample 'nocap': no .txt caption member"):
        open_dataset(f"wds:{tmp_path}/a.tar")
    ds = open_dataset(f"wds:{tmp_path}/a.tar", skip_bad=True)
    assert ds.captions == ["fine"] and len(ds.skipped) == 3
    reasons = " | ".join(s["reason"] for s in ds.skipped)
    assert "empty caption" in reasons and "not valid UTF-8" in reasons


def test_wds_truncated_shard_and_image(tmp_path: Path):
    buf = io.BytesIO()  # noise does not compress: the image is ~12 kB, so byte 1200 is inside it
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    big = buf.getvalue()
    _shard(tmp_path / "a.tar", [("s0", big, b"first"), ("s1", big, b"second")])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:1200])  # cut inside the first sample's image
    with pytest.raises(DataError, match=r"b.tar: not a readable uncompressed tar shard"):
        open_dataset(f"wds:{tmp_path}/b.tar")
    with pytest.raises(DataError, match=r"nope.tar: shard not found"):
        open_dataset(f"wds:{tmp_path}/nope.tar")
    _shard(tmp_path / "c.tar", [("small", image_bytes(RED), b"kept"), ("s1", big, b"lost")])
    (tmp_path / "c.tar").write_bytes((tmp_path / "c.tar").read_bytes()[:3000])  # inside s1's image
    ds = open_dataset(f"wds:{tmp_path}/c.tar", skip_bad=True)
    assert ds.captions == ["kept"] and "cut off" in ds.skipped[0]["reason"]
    ds = open_dataset(f"wds:{tmp_path}/a.tar")
    (tmp_path / "a.tar").write_bytes(data[:1200])  # the shard shrinks after it was indexed
    with pytest.raises(BadSampleError, match="shard truncated") as e:
        ds.load_image(0)
    assert e.value.image_index == 0


# ---- Fashion-MNIST ------------------------------------------------------------------------------


def _idx(path: Path, arr: np.ndarray) -> None:
    magic = 0x0800 | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def fm_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_splits_labels_and_captions(fm_root: Path):
    spec = f"fashion-mnist?root={fm_root}&n_val=6&captions_per_image=2"
    train, val, test = (open_dataset(spec, s) for s in ("train", "val", "test"))
    assert (train.n_images, val.n_images, test.n_images) == (24, 6, 10)
    assert not set(train.image_keys) & set(val.image_keys)
    assert val.image_keys == open_dataset(spec, "val").image_keys  # carved deterministically
    assert test.labels.tolist() == list(range(10)) and test.class_names[9] == "Ankle boot"
    assert test.n_captions == 20 and "ankle boot" in test.captions[18]
    assert len(set(test.captions[18:20])) == 2  # two different templates for one image
    img = test.load_image(3)
    assert img.size == (28, 28) and img.mode == "RGB"
    raw = np.frombuffer(gzip.decompress((fm_root / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    assert np.array_equal(np.asarray(img)[..., 0], raw.reshape(10, 28, 28)[3])


def test_fashion_mnist_missing_or_truncated(tmp_path: Path, fm_root: Path):
    with pytest.raises(DataError, match="install the Debian package dataset-fashion-mnist"):
        open_dataset(f"fashion-mnist?root={tmp_path / 'none'}", "test")
    labels = fm_root / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-3]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: truncated idx data"):
        open_dataset(f"fashion-mnist?root={fm_root}", "test")


# ---- summary and CLI --------------------------------------------------------------------------


def test_summary_and_cli(csv_dir: Path):
    (csv_dir / "p.csv").write_text("filepath,title\nimg/a.png,red\nimg/a.png,rouge\nimg/b.jpg,blue\n")
    s = summarize(open_dataset(f"csv:{csv_dir / 'p.csv'}"), examples=2)
    assert (s["images"], s["captions"], s["captions_per_image"]["max"]) == (2, 3, 2)
    assert s["examples"] == [("img/a.png", "red"), ("img/b.jpg", "blue")]
    runner = CliRunner()
    out = runner.invoke(main, ["data", "demo-scenes?n_val=7", "--split", "val", "--examples", "2"])
    assert out.exit_code == 0, out.output
    assert "7" in out.output and "captions/image" in out.output
    bad = runner.invoke(main, ["data", "nothing:here"])
    assert bad.exit_code == 2 and "unknown kind 'nothing'" in bad.output
