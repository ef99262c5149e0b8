"""ExecuTorch (.pte), PyTorch's own on-device runtime: torch.export → ``to_edge_transform_and_lower``
with a delegate's partitioner → ``to_executorch``.

The delegate is the profile's ``options.delegate``: ``xnnpack`` (CPU, Android/Linux/iOS) or
``coreml`` (Apple; docs/adding-a-target.md records what it does on Linux). fp32 lowers the float
towers; int8 is PT2E with the XNNPACK quantizer (int8 weights per channel, activations per tensor;
QAT through the trainer hooks like the tflite family; the token-embedding table int8 per row, gathered
by the portable kernels), lowered the same way. The I/O stays float32
images and int32 tokens. Every model entry records which share of the graph's ops the delegate took
(``delegation``, from the lowered program's delegation info): ops it leaves run on ExecuTorch's
portable CPU kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_msd.contract.numerics import run_batched
from edge_msd.errors import ConfigError, QuantError
from edge_msd.families.common.base import (
    INPUT_NAMES,
    OUTPUT_NAME,
    ExportRequest,
    Family,
    Runner,
    export_tower,
    io_entry,
)
from edge_msd.families.common.pt2e import PT2EQuantizer, converted, finite_inputs, keep_float_filter
from edge_msd.families.common.quantizer import first_line, io_entries, quiet
from edge_msd.families.declarations import DECLARATIONS

if TYPE_CHECKING:
    from edge_msd.targets import TargetProfile

ET_DTYPES = {6: "float32", 3: "int32", 4: "int64", 1: "int8", 0: "uint8", 5: "float16"}  # ScalarType ids
BOOKKEEPING = ("getitem",)  # nodes that only unpack a delegate's outputs: not ops left undelegated


def _partitioner(delegate: str) -> Any:
    if delegate == "coreml":
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        return CoreMLPartitioner()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner()


def lower_to_pte(module: nn.Module, example: torch.Tensor, path: Path, delegate: str) -> dict[str, Any]:
    """Export ``module`` at ``example``'s static shape, lower it to ``delegate`` and write the .pte;
    returns the delegation summary."""
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        ep = torch.export.export(module, (example,))
    edge = to_edge_transform_and_lower(ep, partitioner=[_partitioner(delegate)])
    summary = delegation(edge.exported_program().graph_module, delegate)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(edge.to_executorch().buffer)
    return summary


def delegation(graph_module: Any, delegate: str) -> dict[str, Any]:
    """How many of the lowered graph's op nodes the delegate took, and which ops it left (op → count)."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    left = {
        b.op_type: b.non_delegated
        for b in info.delegation_by_operator.values()
        if b.non_delegated and b.op_type not in BOOKKEEPING
    }
    taken = int(info.num_delegated_nodes)
    total = taken + sum(left.values())
    return {
        "delegate": delegate,
        "delegated_ops": taken,
        "ops": total,
        "delegated_share": round(taken / total, 4) if total else 0.0,
        "delegated_subgraphs": int(info.num_delegated_subgraphs),
        "not_delegated": dict(sorted(left.items(), key=lambda kv: -kv[1])),
    }


def pte_method(path: Path) -> Any:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def pte_runner(path: Path, batch: int) -> Runner:
    """The .pte through ExecuTorch's Python runtime (it takes torch tensors), at its static batch."""
    method = pte_method(path)

    def run(chunk: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(chunk))])[0].numpy()

    return lambda x: run_batched(run, x, batch)


class XNNPACKInt8(PT2EQuantizer):
    suffix = ".pte"
    runtime = "executorch"

    def pt2e_quantizer(self, dynamic: bool, qat: bool, keep_float: tuple[str, ...]) -> Any:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, is_dynamic=dynamic)
        keep = keep_float_filter(keep_float, finite_inputs)
        return XNNPACKQuantizer().set_global(config).set_filter_function(keep)

    def write(self, prepared: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
        try:
            with torch.no_grad(), quiet():
                model = converted(prepared, fold_quantize=True)
                out_dim = int(model(example).shape[-1])
                found = lower_to_pte(model, example, path, "xnnpack")
        except Exception as e:
            raise QuantError(f"{path.name}: ExecuTorch XNNPACK int8 lowering failed: {first_line(e)}") from e
        kind = "dynamic-range" if prepared.meta["edge_msd"]["dynamic"] else "static"
        io_ = io_entries(example, out_dim, int(example.shape[0]))
        return {"format": "pte", "precision": "int8", "quantization": kind, **io_, "delegation": found}

    def run(self, path: Path, x: np.ndarray) -> np.ndarray:
        batch = _method_meta(path).input_tensor_meta(0).sizes()[0]
        return pte_runner(path, int(batch))(x)


class ExecuTorchFamily(Family):
    declaration = DECLARATIONS["executorch"]
    format = "pte"
    ext = "pte"
    quantizer = XNNPACKInt8
    fused_input = True  # the same FusedImageInput; XNNPACK or the interpreter runs the cast

    def write(self, req: ExportRequest, tower: str, path: Path) -> dict[str, Any]:
        module, example = export_tower(req, tower, req.profile.batch_sizes[0])
        try:
            with quiet():
                return {"delegation": lower_to_pte(module, torch.from_numpy(example), path,
                                                   req.profile.options.delegate)}
        except Exception as e:  # the lowering raises many types; its first line names the op
            raise ConfigError(f"ExecuTorch lowering of the {tower} tower failed: {first_line(e)}") from e

    def describe(self, folder: Path, rel: str, tower: str, precision: str, profile: TargetProfile) -> dict:
        meta = _method_meta(folder / rel)

        def entry(t: Any, name: str, layout: str | None = None) -> dict:
            return io_entry(name, list(t.sizes()), ET_DTYPES.get(int(t.dtype()), str(t.dtype())), layout)

        image = tower == "image"
        return {"file": rel, "format": self.format, "precision": precision,
                "inputs": [entry(meta.input_tensor_meta(0), INPUT_NAMES[tower], "NCHW" if image else None)],
                "outputs": [entry(meta.output_tensor_meta(0), OUTPUT_NAME)]}

    def check_graph(self, profile: TargetProfile, models: dict[str, dict], folder: Path, warn: Any) -> dict:
        """The delegation each tower's lowering recorded; a warning per tower with ops left undelegated."""
        out: dict[str, Any] = {"delegate": profile.options.delegate}
        for tower, entry in models.items():
            found = out[tower] = entry.get("delegation", {})
            if found.get("not_delegated"):
                ops = ", ".join(f"{op}×{n}" for op, n in found["not_delegated"].items())
                warn(f"{profile.name} {tower} tower: {found['delegate']} takes {found['delegated_ops']} of "
                     f"{found['ops']} ops; the portable kernels run {ops}")
        return out

    def runner(self, entry: dict, bundle_dir: Path) -> Runner | str:
        if entry.get("delegation", {}).get("delegate") == "coreml":
            return "the Core ML delegate runs on Apple devices only"
        return pte_runner(bundle_dir / entry["file"], entry["inputs"][0]["shape"][0])


def _method_meta(path: Path) -> Any:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).metadata("forward")


FAMILY = ExecuTorchFamily()
