"""``demo-scenes``: procedurally generated compositional scenes with captions; no download.

Each image holds one or two coloured shapes (6 shapes, 8 colours, 2 sizes) placed at a position
(single object) or in a relation (left of / right of / above / below) on a plain or textured
background (4 colours x 4 textures). Every image gets ``captions_per_image`` paraphrases from
different templates, each naming every attribute, so captions identify their image.

Determinism: scene parameters come from a ``random.Random`` seeded by (seed, split, index, attempt)
alone, and the image is rendered from those parameters in ``load_image`` (no pixels are stored).
Scenes are drawn split by split in the order test, val, train, each re-drawn until its description
is new, so descriptions are unique across all splits and the test split does not change when
``n_train`` does. Held-out colour-shape pairs (``HELD_OUT``) appear only in the test split: half of
its images contain one (``dataset.held_out`` marks them), so test recall can be read separately for
seen and unseen combinations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from edge_msd.data.base import ImageTextDataset
from edge_msd.data.spec import Spec, check_positive, check_split, resolve_options
from edge_msd.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 35),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 70, 215),
    "purple": (135, 50, 185),
    "pink": (245, 135, 195),
}
SIZES = {"small": 0.11, "large": 0.18}  # radius as a fraction of the image side
BACKGROUNDS = {
    "white": (232, 232, 232),
    "gray": (125, 125, 125),
    "black": (22, 22, 22),
    "brown": (105, 72, 45),
}
TEXTURES = ("plain", "striped", "checkered", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "above")  # canonical; captions also use the inverses
INVERSE = {"left of": "right of", "above": "below"}
# Colour-shape pairs never seen in train/val (one per shape and per colour, so none dominates).
HELD_OUT = frozenset(
    {
        ("red", "triangle"),
        ("blue", "circle"),
        ("green", "square"),
        ("yellow", "star"),
        ("purple", "diamond"),
        ("orange", "hexagon"),
    }
)
SPLITS = ("train", "val", "test")
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
_ORDER = ("test", "val", "train")  # generation order for cross-split uniqueness
_P_TWO = 0.6  # chance of a two-object draw (~2/3 of scenes end up so: re-draws of repeats favour them)
_MAX_ATTEMPTS = 64

DEFAULTS = {"n_train": 8000, "n_val": 500, "n_test": 1000, "seed": 0, "size": 96, "captions_per_image": 2}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    x: float  # centre, fraction of the image side
    y: float
    tint: tuple[int, int, int]  # small colour jitter, so pixel values are not a lookup table


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    where: str  # a POSITIONS entry (one object) or a RELATIONS entry (objects[0] REL objects[1])
    bg: str
    texture: str

    def key(self) -> tuple:
        """What the captions say about the scene; two scenes with the same key read the same."""
        return (tuple((o.colour, o.shape, o.size) for o in self.objects), self.where, self.bg, self.texture)

    @property
    def held_out(self) -> bool:
        return any((o.colour, o.shape) in HELD_OUT for o in self.objects)


# ---- sampling -----------------------------------------------------------------------------


def _rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    return random.Random((seed << 44) | (_SPLIT_ID[split] << 40) | (attempt << 32) | index)


_ALLOWED = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
_HELD = sorted(HELD_OUT)


def _jitter(r: random.Random) -> tuple[int, int, int]:
    return (r.randint(-12, 12), r.randint(-12, 12), r.randint(-12, 12))


def _sample_scene(r: random.Random, force_held_out: bool) -> Scene:
    n = 2 if r.random() < _P_TWO else 1
    pairs = [r.choice(_ALLOWED) for _ in range(n)]
    if force_held_out:
        pairs[r.randrange(n)] = r.choice(_HELD)
    while n == 2 and pairs[0] == pairs[1]:
        pairs[1] = r.choice(_ALLOWED)
    sizes = [r.choice(tuple(SIZES)) for _ in range(n)]
    if n == 1:
        where = r.choice(POSITIONS)
        cx, cy = {
            "left": (0.26, 0.5),
            "right": (0.74, 0.5),
            "top": (0.5, 0.26),
            "bottom": (0.5, 0.74),
            "center": (0.5, 0.5),
        }[where]
        span = 0.04 if where != "center" else 0.05
        centres = [
            (
                cx + r.uniform(-span, span),
                cy
                + r.uniform(
                    -0.1 if where in ("left", "right") else span, 0.1 if where in ("left", "right") else span
                ),
            )
        ]
    else:
        where = r.choice(RELATIONS)
        # along the relation axis the objects are >= 0.36 apart (no overlap even when both are large);
        # across it they differ by < 0.15, so the relation is never ambiguous.
        a, b = r.uniform(0.2, 0.32), r.uniform(0.68, 0.8)
        u = r.uniform(0.3, 0.7)
        v = min(max(u + r.uniform(-0.15, 0.15), 0.3), 0.7)
        centres = [(a, u), (b, v)] if where == "left of" else [(u, a), (v, b)]
    objs = tuple(
        Obj(c, s, z, x, y, _jitter(r)) for (c, s), z, (x, y) in zip(pairs, sizes, centres, strict=True)
    )
    return Scene(objs, where, r.choice(tuple(BACKGROUNDS)), r.choice(TEXTURES))


@lru_cache(maxsize=8)
def _all_scenes(seed: int, counts: tuple[tuple[str, int], ...]) -> dict[str, tuple[Scene, ...]]:
    """Scenes of every split up to the one asked for, unique by description across splits."""
    seen: set[tuple] = set()
    out: dict[str, tuple[Scene, ...]] = {}
    for split, n in counts:
        scenes = []
        for i in range(n):
            force = split == "test" and i % 2 == 0
            for attempt in range(_MAX_ATTEMPTS):
                scene = _sample_scene(_rng(seed, split, i, attempt), force)
                if scene.key() not in seen:
                    break
            seen.add(scene.key())  # after _MAX_ATTEMPTS a repeat is kept: the space is exhausted
            scenes.append(scene)
        out[split] = tuple(scenes)
    return out


# ---- captions -----------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POS_WORDS = {
    "left": ("on the left", "at the left side"),
    "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_REL_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}
_TEX_WORDS = {
    "plain": ("plain",),
    "striped": ("striped",),
    "checkered": ("checkered", "checkerboard"),
    "dotted": ("dotted", "polka-dot"),
}

_ONE = (
    "{a_obj} {pos} on {a_bg}",
    "{A_bg} with {a_obj} {pos}",
    "a picture of one {obj}, {pos}, over {a_bg}",
    "there is {a_obj} {pos}; the background is {bg_desc}",
)
_TWO = (
    "{a_obj} {rel} {b_obj} on {a_bg}",
    "{A_bg} with {a_obj} {rel} {b_obj}",
    "two shapes over {a_bg}: {a_obj} is {rel} {b_obj}",
    "a picture of {a_obj} placed {rel} {b_obj}; the background is {bg_desc}",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(r: random.Random | None, words: tuple[str, ...]) -> str:
    return words[0] if r is None else r.choice(words)


def _obj_words(o: Obj, r: random.Random | None) -> str:
    return f"{_pick(r, _SIZE_WORDS[o.size])} {o.colour} {o.shape}"


def _bg_words(scene: Scene, r: random.Random | None) -> dict[str, str]:
    a_bg = _article(f"{_pick(r, _TEX_WORDS[scene.texture])} {scene.bg} background")
    bg_desc = f"plain {scene.bg}" if scene.texture == "plain" else f"{scene.bg} and {scene.texture}"
    return {"a_bg": a_bg, "A_bg": a_bg[0].upper() + a_bg[1:], "bg_desc": bg_desc}


def caption(scene: Scene, template: int, r: random.Random | None) -> str:
    """Caption ``scene`` with template number ``template``.

    ``r`` picks synonyms and whether two objects are named in the other order with the inverse
    relation; without it the first synonym is used and objects[0] comes first (canonical wording).
    """
    words = _bg_words(scene, r)
    if len(scene.objects) == 1:
        obj = _obj_words(scene.objects[0], r)
        return _ONE[template].format(
            obj=obj, a_obj=_article(obj), pos=_pick(r, _POS_WORDS[scene.where]), **words
        )
    first, second = scene.objects
    rel = scene.where
    if r is not None and r.random() < 0.5:
        first, second, rel = second, first, INVERSE[rel]
    return _TWO[template].format(
        a_obj=_article(_obj_words(first, r)),
        b_obj=_article(_obj_words(second, r)),
        rel=_pick(r, _REL_WORDS[rel]),
        **words,
    )


def _captions(scene: Scene, k: int, r: random.Random) -> list[str]:
    templates = r.sample(range(len(_ONE)), k)
    return [caption(scene, t, r) for t in templates]


# ---- rendering ----------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _texture_mask(texture: str, size: int) -> np.ndarray | None:
    """Boolean (size, size) pattern where the background is drawn in its second shade."""
    if texture == "plain":
        return None
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "striped":
        return ((xx + yy) // max(size // 12, 2)) % 2 == 0
    if texture == "checkered":
        cell = max(size // 6, 2)
        return ((xx // cell) + (yy // cell)) % 2 == 0
    period = max(size // 8, 4)
    d = (xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2
    return d < (period / 4) ** 2


def _shape_points(shape: str, cx: float, cy: float, rad: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = rad * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - rad), (cx + rad * 0.95, cy + rad * 0.75), (cx - rad * 0.95, cy + rad * 0.75)]
    if shape == "diamond":
        return [(cx, cy - rad), (cx + rad * 0.75, cy), (cx, cy + rad), (cx - rad * 0.75, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -np.pi / 2 + k * np.pi / 5
            rr = rad if k % 2 == 0 else rad * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    if shape == "hexagon":
        return [(cx + rad * np.cos(k * np.pi / 3), cy + rad * np.sin(k * np.pi / 3)) for k in range(6)]
    raise ValueError(shape)


def render(scene: Scene, size: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels."""
    base = np.array(BACKGROUNDS[scene.bg], dtype=np.uint8)
    arr = np.empty((size, size, 3), dtype=np.uint8)
    arr[:] = base
    mask = _texture_mask(scene.texture, size)
    if mask is not None:
        shade = np.clip(base.astype(np.int16) + (40 if scene.bg in ("black", "brown") else -40), 0, 255)
        arr[mask] = shade.astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = tuple(int(min(max(c + t, 0), 255)) for c, t in zip(COLOURS[o.colour], o.tint, strict=True))
        cx, cy, rad = o.x * size, o.y * size, SIZES[o.size] * size
        if o.shape == "circle":
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=fill)
        else:
            draw.polygon(_shape_points(o.shape, cx, cy, rad), fill=fill)
    return img


# ---- the dataset --------------------------------------------------------------------------


@dataclass
class DemoScenes(ImageTextDataset):
    """One split of the generated scene set; ``scenes[i]`` is what image ``i`` shows."""

    scenes: tuple[Scene, ...] = ()
    size: int = 96
    held_out: np.ndarray | None = None  # bool per image: shows a colour-shape pair unseen in training

    def load_image(self, index: int) -> Image.Image:
        return render(self.scenes[index], self.size)

    def counterfactuals(self, index: int) -> dict[str, str]:
        """Captions of image ``index`` with one attribute changed, for probing what a model tells apart.

        Keys: ``relation`` (objects swapped / position changed), ``colour`` (two-object scenes: the
        colours swapped between the shapes; one object: another colour), ``shape`` and ``size``.
        All use the first template and canonical wording, so they differ from ``original`` only
        in the changed attribute.
        """
        scene = self.scenes[index]
        objs = scene.objects
        variants: dict[str, Scene] = {}
        if len(objs) == 2:
            a, b = objs
            variants["relation"] = Scene((b, a), scene.where, scene.bg, scene.texture)
            variants["colour"] = Scene(
                (_with(a, colour=b.colour), _with(b, colour=a.colour)), scene.where, scene.bg, scene.texture
            )
            variants["shape"] = Scene(
                (_with(a, shape=b.shape), _with(b, shape=a.shape)), scene.where, scene.bg, scene.texture
            )
            variants["size"] = Scene(
                (_with(a, size=_other_size(a.size)), b), scene.where, scene.bg, scene.texture
            )
        else:
            (o,) = objs
            opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}
            variants["relation"] = Scene(objs, opposite[scene.where], scene.bg, scene.texture)
            others = [c for c in COLOURS if c != o.colour]
            variants["colour"] = Scene(
                (_with(o, colour=others[index % len(others)]),), scene.where, scene.bg, scene.texture
            )
            shapes = [s for s in SHAPES if s != o.shape]
            variants["shape"] = Scene(
                (_with(o, shape=shapes[index % len(shapes)]),), scene.where, scene.bg, scene.texture
            )
            variants["size"] = Scene(
                (_with(o, size=_other_size(o.size)),), scene.where, scene.bg, scene.texture
            )
        out = {"original": caption(scene, 0, None)}
        out.update({k: caption(v, 0, None) for k, v in variants.items()})
        return out


def _with(o: Obj, **changes: str) -> Obj:
    return Obj(
        changes.get("colour", o.colour),
        changes.get("shape", o.shape),
        changes.get("size", o.size),
        o.x,
        o.y,
        o.tint,
    )


def _other_size(size: str) -> str:
    return "large" if size == "small" else "small"


def open_demo_scenes(spec: Spec, split: str) -> DemoScenes:
    opts = resolve_options(spec, DEFAULTS)
    if spec.path:
        raise ConfigError(f"dataset spec {spec.text!r}: demo-scenes takes no path (options go after '?')")
    check_split(spec, split, list(SPLITS))
    check_positive(spec, opts, "n_train", "n_val", "n_test", allow_zero=True)
    check_positive(spec, opts, "seed", allow_zero=True)
    if not 16 <= opts["size"] <= 1024:
        raise ConfigError(
            f"dataset spec {spec.text!r}: option 'size': expected 16..1024 pixels, got {opts['size']}"
        )
    if not 1 <= opts["captions_per_image"] <= len(_ONE):
        raise ConfigError(
            f"dataset spec {spec.text!r}: option 'captions_per_image': expected 1..{len(_ONE)} "
            f"(one per template), got {opts['captions_per_image']}"
        )
    counts = []
    for s in _ORDER:
        counts.append((s, opts[f"n_{s}"]))
        if s == split:
            break
    scenes = _all_scenes(opts["seed"], tuple(counts))[split]
    captions: list[str] = []
    owner: list[int] = []
    for i, scene in enumerate(scenes):
        r = random.Random((opts["seed"] << 44) | (_SPLIT_ID[split] << 40) | (0xFF << 32) | i)
        for c in _captions(scene, opts["captions_per_image"], r):
            captions.append(c)
            owner.append(i)
    return DemoScenes(
        spec=spec.text,
        split=split,
        image_keys=[f"{split}/{i:06d}" for i in range(len(scenes))],
        captions=captions,
        caption_image_index=np.asarray(owner, dtype=np.int64),
        scenes=scenes,
        size=opts["size"],
        held_out=np.array([s.held_out for s in scenes], dtype=bool),
    )
