"""Float32 linears on CPU through oneDNN with their weights packed once at load (PyTorch's own oneDNN build:
``torch.ops.mkldnn._reorder_linear_weight`` packs a weight, ``torch.ops.mkldnn._linear_pointwise`` multiplies
by it; the ops PyTorch's inductor uses for CPU linears).

Why: PyTorch's default CPU matmul (``F.linear``) was the torch backend's bottleneck on the project's CPU machine
(AMD EPYC, 2 cores): the bench shape's 24 layers of linears plus its LM head, one decode step, measured in one
process alternating with ONNX Runtime's MLAS kernel over prepacked weights (scratch script, 16 alternations,
medians): 4 rows 45.6 ms packed here against 58.1 ms MLAS (x1.27), 8 rows 41.4 against 63.1; ``F.linear``
took 80 ms for one row and 134 for four. A packed weight gives each row the same numbers whatever the number
of rows from two up (tested: 1 to 16); one row alone may round differently (another kernel for K = 4864),
within float rounding. ``pack_linears`` is used where none of the layer's callers needs the weight itself
(``keep=False``: the torch backend's trunk, which never runs a backward) or keeps both (the head: V-Reason's
update backpropagates through its last layer, ``grad @ W`` over the kept weight; the LM head's own input
gradient reads the kept weight too, ``models.qwen2_5_vl.layers.input_grad``).

The ops are PyTorch internals: ``usable`` checks at load that they exist and agree with ``F.linear`` on a small
product, and where they do not the linears stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_HINT = 4  # the rows oneDNN is told to expect when packing (the engine's default batch)


def usable(device, dtype: torch.dtype) -> bool:
    """Whether linears on ``device`` in ``dtype`` can be packed here (CPU, float32, PyTorch built with oneDNN and
    its packed-linear ops answering as ``F.linear`` does)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.linspace(-1, 1, 24 * 40).view(24, 40).cos(), torch.linspace(-2, 2, 3 * 40).view(3, 40)
        y = _matmul(x, torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT), None)
    except (AttributeError, RuntimeError):
        return False
    return y.shape == (3, 24) and torch.allclose(y, nn.functional.linear(x, w), rtol=1e-4, atol=1e-5)


def _matmul(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


class _Backward(torch.autograd.Function):
    """y = x W^T + b through the packed weight; the input's gradient ``grad @ W`` over the kept weight (the weights
    and bias are frozen: V-Reason optimizes the value cache only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.layer.weight
        if w is None:
            raise RuntimeError("this packed linear kept no weight for a backward (packed with keep=False)")
        return grad @ w.to(grad.dtype), None


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s forward over its weight packed for oneDNN (see the module docstring). ``weight`` is the
    original weight where it was kept (``keep=True``), else None."""

    def __init__(self, linear: nn.Linear, keep: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), ROWS_HINT)  # (not a buffer: opaque)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.weight = linear.weight if keep else None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _matmul(x.detach().reshape(-1, shape[-1]).contiguous(), self.packed, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Backward.apply(x, self)
        return self.run(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight kept={self.weight is not None}")


def pack_linears(module: nn.Module, keep: bool) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a ``PackedLinear`` (``keep``: keep the original weight, for a
    backward or other readers; else it is released where nothing else holds it). Returns how many were packed."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear(child, keep))
            n += 1
        else:
            n += pack_linears(child, keep)
    return n
