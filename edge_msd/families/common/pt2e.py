"""PT2E (torch.export + torchao prepare/convert) quantization, shared by the families whose toolchain
takes a PT2E graph (tflite through litert-torch, executorch through XNNPACK): each gives its own
torchao ``Quantizer`` (``pt2e_quantizer``) and its own ``write``; preparing, calibrating, the QAT
milestones and the simulated int8 graph are the same.
"""

from __future__ import annotations

import copy
import operator
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edge_msd.errors import QuantError
from edge_msd.families.common.embedding import TABLE, int8_token_embedding
from edge_msd.families.common.quantizer import Quantizer, calibrate, matches


class PT2EQuantizer(Quantizer):
    """A family's int8 recipe on a torch.export graph; subclasses give the torchao quantizer and write."""

    def pt2e_quantizer(self, dynamic: bool, qat: bool, keep_float: tuple[str, ...]) -> Any:
        """The torchao ``Quantizer`` that annotates the graph (nodes inside ``keep_float`` stay float)."""
        raise NotImplementedError

    def quantize(self, tower: nn.Module, batches: list[torch.Tensor], *, qat: bool = False,
                 keep_float: Iterable[str] = (), n_steps: int | None = None) -> nn.Module:
        return self._prepare(tower, batches, qat=qat, keep_float=keep_float, dynamic=False)

    def quantize_dynamic(self, tower: nn.Module, batches: list[torch.Tensor]) -> nn.Module | None:
        return self._prepare(tower, batches, qat=False, keep_float=(), dynamic=True)

    def _prepare(
        self,
        tower: nn.Module,
        batches: list[torch.Tensor],
        *,
        qat: bool,
        keep_float: Iterable[str],
        dynamic: bool,
    ) -> nn.Module:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.utils import _fuse_conv_bn_

        patterns = (*self.recipe.keep_float, *keep_float, TABLE)
        example = batches[0]
        tower = int8_token_embedding(copy.deepcopy(tower)).eval()
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            gm = torch.export.export(tower, (example,), dynamic_shapes=({0: batch},)).module()
        except Exception as e:
            raise QuantError(
                f"{type(tower).__name__}: torch.export failed, PT2E needs an exportable tower: {e}"
            ) from e
        # BatchNorm is folded into its conv with the float student's running statistics, for QAT too
        # (they stay frozen): the int8 graph then has no float BN ops between quantized convs.
        _fuse_conv_bn_(gm)
        qat = qat and not dynamic
        quantizer = self.pt2e_quantizer(dynamic, qat, patterns)
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(gm, quantizer)
        prepared.meta["edge_msd"] = {
            "quantizer": quantizer,
            "dynamic": dynamic,
            "bn_frozen": False,
            "qat": qat,
        }
        allow_train_eval(prepared)
        prepared.eval()
        calibrate(prepared, batches)
        return prepared.train(qat)

    def simulate(self, prepared: nn.Module) -> nn.Module:
        """PTQ's prepared graph only observes; its converted copy runs the quantize/dequantize ops."""
        if prepared.meta["edge_msd"].get("qat"):
            return prepared
        return converted(prepared)

    def layers(self, prepared: nn.Module) -> list[str]:
        names = []
        for node in prepared.graph.nodes:
            if node.op == "call_function" and node.target in (
                torch.ops.aten.conv2d.default,
                torch.ops.aten.linear.default,
            ):
                stack = node.meta.get("nn_module_stack", {})
                names.append(list(stack.values())[-1][0] if stack else node.name)
        return names

    def freeze_observers(self, prepared: nn.Module) -> None:
        from torchao.quantization.pt2e import disable_observer

        prepared.apply(disable_observer)

    def freeze_bn(self, prepared: nn.Module) -> None:
        """Switch the exported graph's batch_norm ops to inference (running stats no longer update)."""
        prepared.meta["edge_msd"]["bn_frozen"] = True
        prepared.train(prepared.training)


def keep_float_filter(keep_float: tuple[str, ...], filter_fn: Any = None) -> Any:
    """A node filter for torchao annotators: False for nodes inside ``keep_float`` modules."""

    def accept(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack", {})
        if any(matches(path, keep_float) for path, _ in stack.values()):
            return False
        return filter_fn(node) if filter_fn is not None else True

    return accept


def finite_inputs(node: Any) -> bool:
    """False for ops fed by a mask constant, one holding ±inf or the dtype's extreme (the text tower's
    causal attention mask, through a dtype cast; masks built from ``finfo.min``): an int8 add annotator
    would give that add an int8 range, which either drops the mask (the observer ignores inf) or spends
    every level on it, and the text tower would attend to future tokens or lose its activations."""
    for arg in node.all_input_nodes:
        while arg.op == "call_function" and len(arg.all_input_nodes) == 1:  # casts, views, copies
            arg = arg.all_input_nodes[0]
        value = _constant(arg)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and _masking(value):
            return False
    return True


def _masking(value: torch.Tensor) -> bool:
    return bool(value.numel()) and not (value.abs() < torch.finfo(value.dtype).max).all()


def _constant(node: Any) -> Any:
    """The value a ``get_attr`` node reads from its graph module; None for any other node."""
    return operator.attrgetter(node.target)(node.graph.owning_module) if node.op == "get_attr" else None


def float_mul(node: Any) -> bool:
    """True for muls that int8 would only wrap in QUANTIZE/DEQUANTIZE ops, because what they feed stays
    float: a scaling by one number (the attention's query scale, before the float attention matmul) and a
    product with a mask computed from the integer inputs alone (the text pooling's one-hot weights of the
    token ids, before the float projection)."""
    if node.op != "call_function" or node.target != torch.ops.aten.mul.Tensor:
        return False
    return any(_one_number(arg) or _integer_derived(arg) for arg in node.args[:2])


def _one_number(arg: Any) -> bool:
    if not isinstance(arg, torch.fx.Node):
        return isinstance(arg, int | float)
    value = _constant(arg)
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _integer_derived(arg: Any) -> bool:
    """Whether ``arg`` is computed from graph inputs that are all integer tensors (and constants)."""
    if not isinstance(arg, torch.fx.Node):
        return False
    seen, stack, inputs = set(), [arg], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            inputs.append(node.meta.get("val"))
        stack.extend(node.all_input_nodes)
    return bool(inputs) and all(isinstance(v, torch.Tensor) and not v.is_floating_point() for v in inputs)


def tag_adds(model: torch.fx.GraphModule) -> None:
    """Record ``source_fn_stack`` on aten adds that lack it: litert-torch's add annotator finds adds by
    that tag, which non-strict ``torch.export`` leaves empty, so the residual adds stayed float."""
    for node in model.graph.nodes:
        add = node.op == "call_function" and node.target == torch.ops.aten.add.Tensor
        if add and not node.meta.get("source_fn_stack"):
            node.meta["source_fn_stack"] = [(node.name, operator.add)]


def converted(prepared: nn.Module, fold_quantize: bool = False) -> nn.Module:
    """The int8 graph (quantize/dequantize ops) of a prepared graph; ``prepared`` is left as it is.
    ``fold_quantize``: store int8 weights (what XNNPACK's lowering expects) instead of quantizing the
    float weights in the graph (what litert-torch's converter expects)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e(eval_copy(prepared), fold_quantize=fold_quantize)


def allow_train_eval(gm: nn.Module) -> None:
    """Let the trainer call .train()/.eval() on an exported graph: they rewrite its batch_norm (and
    dropout) ops, and keep BatchNorm in inference once ``freeze_bn`` has frozen its statistics."""
    from torchao.quantization.pt2e.export_utils import (
        _move_exported_model_to_eval,
        _move_exported_model_to_train,
        _replace_batchnorm,
    )

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        # each rewrite torch.exports its patterns (about a second): skip graphs without those ops
        if _has_mode_ops(self) and mode:
            _move_exported_model_to_train(self)
            if self.meta["edge_msd"]["bn_frozen"]:
                _replace_batchnorm(self, train_to_eval=True)
        elif _has_mode_ops(self):
            _move_exported_model_to_eval(self)
        self.training = mode
        return self

    gm.train = types.MethodType(train, gm)  # type: ignore[method-assign]
    gm.eval = types.MethodType(lambda self: self.train(False), gm)  # type: ignore[method-assign]


def eval_copy(prepared: nn.Module) -> nn.Module:
    """A copy of a prepared PT2E graph in inference mode (``prepared`` keeps its mode), for convert_pt2e."""
    model = copy.deepcopy(prepared)
    allow_train_eval(model)
    model.eval()
    return model


def _has_mode_ops(gm: nn.Module) -> bool:
    """Whether train/eval changes the graph: only its dropout and batch_norm ops depend on the mode."""
    return any(
        n.op == "call_function" and ("dropout" in str(n.target) or "batch_norm" in str(n.target))
        for n in gm.graph.nodes
    )
