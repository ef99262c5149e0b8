"""PTQ and QAT of a distilled student for one target, ending in a quantized artifact that export ships.

Artifact (``runs/qat/<target>/``, kind ``edge-msd-quantized``)::

    manifest.json           recipe, method (ptq|qat), calibration set (its whole manifest), per tower:
                            file, format, precision, io (shapes, dtypes, int8 input scale/zero point),
                            quantized and float-kept layers, sensitivity scan; QAT: steps, skipped steps
    models/image.<ext>      the deployable image tower (.tflite | .onnx with Q/DQ | .mlpackage)
    models/text.<ext>       the deployable text tower
    quantized_state.safetensors
                            fake-quant towers' state_dicts, keys ``image.*`` / ``text.*`` (re-quantize
                            the student with the same recipe, then load_state_dict, to continue
                            training or re-export)

QAT reuses the distillation trainer (``edge_msd.distill.trainer.train``): ``prepare_model`` swaps the
student for fake-quant towers calibrated on the calibration set, ``on_step`` freezes observers and
BatchNorm statistics at the recipe's milestones; the distillation losses (distill's defaults) against
the cached teacher embeddings are the trainer's own. A NaN step is skipped and counted by the trainer
(too many in a row stop the run); the artifact is written only from finite weights, in a temp folder
renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_msd.artifacts import atomic_dir, write_manifest
from edge_msd.contract.format import TOWERS
from edge_msd.errors import ConfigError, DataError, QuantError
from edge_msd.families.common.quantizer import QUANTIZED_KIND, Quantizer, cosine_to
from edge_msd.families.declarations import Recipe
from edge_msd.quant.calibration import (
    calibration_batches,
    check_calibration_set,
    load_calibration_set,
)
from edge_msd.quant.config import QuantConfig
from edge_msd.quant.recipes import quantizer_for, recipe_for_target
from edge_msd.students.towers import ImageTower, TextTower, load_student_towers

KIND = QUANTIZED_KIND
STATE_FILE = "quantized_state.safetensors"  # safetensors: reading it back cannot run code


class QuantStudent(nn.Module):
    """Fake-quant image and text towers behind the open_clip interface the trainer calls."""

    def __init__(self, image: nn.Module, text: nn.Module, logit_scale: nn.Parameter | None = None):
        super().__init__()
        self.image = image
        self.text = text
        if logit_scale is not None:
            self.logit_scale = logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.image(image)  # the towers already L2-normalise

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.text(tokens.to(torch.int32))


@dataclasses.dataclass
class Calibration:
    """The calibration set, opened: its manifest and the tower inputs it yields."""

    manifest: dict[str, Any]
    images: list[torch.Tensor]
    tokens: list[torch.Tensor]


def load_calibration(cfg: QuantConfig, student: Any) -> Calibration:
    from edge_msd.data import open_dataset

    cs = load_calibration_set(cfg.calibration)
    dataset = open_dataset(cfg.data, cs.split, skip_bad=True)  # as `calibrate` opened it
    if cs.dataset_fingerprint != dataset.fingerprint():
        raise DataError(
            f"{cfg.calibration}: calibration set drawn from {cs.dataset!r}, expected one of {cfg.data!r} "
            f"(the data being quantized for); build it with `edge-msd calibrate --data {cfg.data}`, or pass "
            f"--data {cs.dataset} to calibrate on that data deliberately"
        )
    check_calibration_set(cs, dataset, cfg.min_calibration)
    images, tokens, skipped = [], [], []
    for x, t in calibration_batches(
        cs, dataset, student.val_transform, student.tokenizer, cfg.calib_batch, skipped=skipped
    ):
        images.append(x)
        tokens.append(t)
    return Calibration({**cs.to_manifest(), "skipped_when_loaded": len(skipped)}, images, tokens)


def first_last_layers(tower: nn.Module, example: torch.Tensor) -> list[str]:
    """The first and last Linear/Conv2d the tower runs (execution order, found with forward hooks)."""
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in tower.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    with torch.no_grad():
        tower(example[:1])
    for h in hooks:
        h.remove()
    return [order[0], order[-1]] if order else []


def sensitivity_scan(
    quantizer: Quantizer, prepared: nn.Module, reference: torch.Tensor, batch: torch.Tensor, recipe: Recipe
) -> list[dict[str, Any]]:
    """Leave-one-out: for each quantized layer, how much mean cosine to fp32 returns when it stays float.

    The recipe keeps the ``scan_max_layers`` layers with the largest gain (at least ``scan_min_gain``)."""
    prepared.eval()
    with torch.no_grad():
        base = cosine_to(reference, prepared(batch))
        rows = []
        for name in quantizer.layers(prepared):
            quantizer.set_layer(prepared, name, False)
            rows.append({"layer": name, "gain": cosine_to(reference, prepared(batch)) - base})
            quantizer.set_layer(prepared, name, True)
    rows.sort(key=lambda r: -r["gain"])
    for i, r in enumerate(rows):
        r["kept_float"] = i < recipe.scan_max_layers and r["gain"] >= recipe.scan_min_gain
    return rows


def quantize_tower(
    quantizer: Quantizer,
    tower: nn.Module,
    batches: list[torch.Tensor],
    *,
    qat: bool,
    n_steps: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fake-quantize one tower by the recipe: first/last layers and scanned sensitive layers kept float."""
    recipe = quantizer.recipe
    keep: list[str] = first_last_layers(tower, batches[0]) if recipe.keep_first_last else []
    prepared = quantizer.quantize(tower, batches, qat=qat, keep_float=keep, n_steps=n_steps)
    info: dict[str, Any] = {}
    if recipe.sensitivity_scan:
        with torch.no_grad():
            reference = tower.eval()(batches[0])
        scan = sensitivity_scan(quantizer, prepared, reference, batches[0], recipe)
        info["sensitivity_scan"] = scan
        keep += [r["layer"] for r in scan if r["kept_float"]]
        for name in keep:
            if name in quantizer.layers(prepared):
                quantizer.set_layer(prepared, name, False)
        prepared.train(qat)
    info["kept_float"] = keep + list(recipe.keep_float)
    info["quantized_layers"] = quantizer.layers(prepared)
    with torch.no_grad():
        was = prepared.training
        simulated = quantizer.simulate(prepared.eval())
        info["calibration_cosine"] = cosine_to(tower.eval()(batches[0]), simulated(batches[0]))
        prepared.train(was)
    return prepared, info


def _qat_hooks(quantizer: Quantizer, steps: int) -> Any:
    def on_step(step: int, model: nn.Module) -> None:
        for tower in (model.image, model.text):
            quantizer.on_qat_step(tower, step, steps)

    return on_step


def _check_finite(model: nn.Module, where: str) -> None:
    """Weights must be finite; buffers must not be NaN (causal masks legitimately hold -inf)."""
    tensors = [(n, t, torch.isfinite) for n, t in model.named_parameters()]
    tensors += [(n, t, lambda x: ~torch.isnan(x)) for n, t in model.named_buffers()]
    for name, t, ok in tensors:
        if t.is_floating_point() and not ok(t).all():
            raise QuantError(f"{where}: {name!r} is not finite after QAT; no artifact written")


def run_qat(
    cfg: QuantConfig, quantizer: Quantizer, student: Any, calib: Calibration
) -> tuple[QuantStudent, dict]:
    """Fine-tune with fake quantization through the distillation trainer (its loop, losses, NaN policy)."""
    from edge_msd.distill.config import DistillConfig
    from edge_msd.distill.trainer import train

    preset = _student_preset(Path(cfg.student))
    dcfg = DistillConfig(
        teacher=None,  # the train cache's teacher: QAT needs its cached embeddings, never its weights
        data=cfg.data,
        features=cfg.features,
        val_split=cfg.val_split,
        test_split=None,
        preset=preset,
        init=cfg.student,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        warmup_steps=cfg.warmup_steps,
        eval_every=cfg.steps,
        ckpt_every=cfg.steps,
        seed=cfg.seed,
        force=True,
        augment=False,
        ema_decay=0.0,  # the fake-quant observers and scales are trained state, not weights to average
        out=str(cfg.out_dir().with_name(f".{cfg.out_dir().name}.train")),
    )
    infos: dict[str, Any] = {}

    def prepare_model(model: nn.Module) -> nn.Module:
        image, infos["image"] = quantize_tower(
            quantizer, ImageTower(model), calib.images, qat=True, n_steps=cfg.steps
        )
        text, infos["text"] = quantize_tower(
            quantizer, TextTower(model), calib.tokens, qat=True, n_steps=cfg.steps
        )
        return QuantStudent(image, text, getattr(model, "logit_scale", None))

    result = train(
        dcfg, prepare_model=prepare_model, on_step=_qat_hooks(quantizer, cfg.steps), out_dir=Path(dcfg.out)
    )
    model = result.model
    _check_finite(model, f"QAT of {cfg.student} for {cfg.target}")
    infos["train"] = {
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "out": str(result.out_dir),
        "best_val_rsum": result.best_val_rsum,
        "skipped_data": result.skipped_data,
        "preset": preset,
    }
    return model, infos


def _student_preset(folder: Path) -> str:
    manifest = folder / "manifest.json"
    if manifest.is_file():
        preset = json.loads(manifest.read_text(encoding="utf-8")).get("preset")
        if preset:
            return str(preset)
    raise ConfigError(f"{folder}: the student manifest names no preset; QAT needs it to rebuild the trainer")


def quantize_student(cfg: QuantConfig) -> Path:
    """PTQ or QAT of ``cfg.student`` for ``cfg.target``; writes and returns the quantized artifact."""
    from safetensors.torch import save_file

    from edge_msd.config import config_to_dict
    from edge_msd.targets import load_target

    cfg.validate()
    cfg = cfg.resolved()
    profile = load_target(cfg.target)
    recipe = recipe_for_target(profile)
    quantizer = quantizer_for(recipe)
    out = cfg.out_dir()
    if out.exists() and not cfg.force:
        raise QuantError(f"{out} already exists; pass --force to replace it")
    student = load_student_towers(cfg.student)
    calib = load_calibration(cfg, student)
    if cfg.method == "qat":
        model, infos = run_qat(cfg, quantizer, student, calib)
    else:
        image, img_info = quantize_tower(quantizer, student.image, calib.images, qat=False)
        text, txt_info = quantize_tower(quantizer, student.text, calib.tokens, qat=False)
        model, infos = QuantStudent(image, text), {"image": img_info, "text": txt_info}
    model.eval()
    batch = int(profile.batch_sizes[0]) if not profile.dynamic_batch else 1
    examples = {"image": calib.images[0][:batch], "text": calib.tokens[0][:batch]}
    with atomic_dir(out, force=cfg.force) as tmp:
        (tmp / "models").mkdir()
        towers = {}
        for name in TOWERS:
            path = tmp / "models" / f"{name}{quantizer.suffix}"
            try:
                entry = quantizer.write(getattr(model, name), examples[name], path)
            except QuantError as e:
                # the user may allow it: this tower ships dynamic-range int8 (weights int8, float activations)
                float_tower = student.image if name == "image" else student.text
                inputs = calib.images if name == "image" else calib.tokens
                dyn = quantizer.quantize_dynamic(float_tower, inputs) if recipe.allow_fallback else None
                if dyn is None:
                    raise
                entry = {**quantizer.write(dyn, examples[name], path), "fallback_reason": str(e)}
            towers[name] = {
                "file": f"models/{path.name}",
                **entry,
                **{k: v for k, v in infos[name].items() if k != "sensitivity_scan"},
            }
            if "sensitivity_scan" in infos[name]:
                towers[name]["sensitivity_scan"] = infos[name]["sensitivity_scan"]
        # clones: safetensors refuses tensors that share memory (PT2E graphs do)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.split(".")[0] in TOWERS}
        save_file(state, str(tmp / STATE_FILE))
        write_manifest(
            tmp,
            KIND,
            config=config_to_dict(cfg),
            target=profile.name,
            method=cfg.method,
            recipe=recipe.to_manifest(),
            runtime=quantizer.runtime,
            calibration=calib.manifest,
            student={"source": student.source, "sha256": student.sha256, "name": student.name},
            towers=towers,
            train=infos.get("train"),
        )
    return out
