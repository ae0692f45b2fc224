"""PyTorch modules to ONNX graphs (torch.onnx dynamo exporter), named and shaped by the model's spec."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path

import torch

from models.qwen2_5_vl.spec import GraphSpec

# bounds torch.export needs for each named dynamic axis; real limits are enforced by the runtime
_DIM_BOUNDS = {"batch": (1, 64), "seq": (1, 1 << 17), "past": (0, 1 << 17), "patches": (4, 1 << 20),
               "tokens": (1, 1 << 18), "frame_patches": (4, 1 << 18)}


def dynamic_shapes(spec: GraphSpec):
    """spec.dynamic_axes (input name -> {axis: dim name}) as torch.export dynamic_shapes, following the
    structure of the module's forward (trailing *args grouped in one tuple)."""
    from torch.export import Dim

    dims = {name: Dim.DYNAMIC for name in _DIM_BOUNDS}
    dims.update({n: Dim(n, min=lo, max=hi) for n, (lo, hi) in _DIM_BOUNDS.items() if n in ("seq", "past")})
    per_input = [{axis: dims[d] for axis, d in spec.dynamic_axes.get(n, {}).items()} or None
                 for n in spec.input_names]
    params = list(inspect.signature(spec.module.forward).parameters.values())
    var = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if var is None:
        return tuple(per_input)
    return (*per_input[:var], tuple(per_input[var:]))


def export_graph(spec: GraphSpec, path: Path, opset: int = 18, external_data: bool = False) -> None:
    """Write ``path`` (and ``path.data`` with external_data) for one graph."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. 'torchvision is not installed' notices
    # the exporter reports its steps on stdout; keep the CLI's output to our own progress lines
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module, spec.example, str(path), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec), opset_version=opset, dynamo=True, external_data=external_data,
            verbose=False, optimize=True,
        )
    del program


def name_dynamic_dims(path: Path, spec: GraphSpec) -> None:
    """Give graph inputs/outputs the dim names of the contract (the exporter invents s0, s1, ...) and
    carry the renaming into intermediate value infos; weights (external data) are left untouched."""
    import re

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    axes = spec.dynamic_axes
    rename: dict[str, str] = {}
    for v in [*model.graph.input, *model.graph.output]:
        for axis, dim in enumerate(v.type.tensor_type.shape.dim):
            want = axes.get(v.name, {}).get(axis)
            if want is None:
                continue
            if re.fullmatch(r"s\d+", dim.dim_param or ""):
                rename.setdefault(dim.dim_param, want)
            dim.dim_param = want
    if rename:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
        for v in model.graph.value_info:
            for dim in v.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    onnx.save(model, str(path))
