"""Building blocks shared by the vision encoder and the decoder: norm, MLP, activations, rotary helpers.

Written with plain tensor ops only (no SDPA, no data-dependent Python control flow) so that the same
modules trace into standard ONNX operators that TensorRT's parser accepts.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from models.errors import CheckpointError

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise CheckpointError(
            f"config.json: unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: half types go to fp32, fp64 stays (so float64 reference checks stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


class _GivenOutput(torch.autograd.Function):
    """``linear(x)`` whose value was already computed for this very ``x`` elsewhere: the forward hands that value
    back without reading the weights; the backward is the linear's own gradient with respect to ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, grad_fn) -> torch.Tensor:
        ctx.grad_fn = grad_fn
        return y.clone()  # the caller's buffer may be written again (a graph's bound output) before the backward

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.grad_fn(grad), None, None


def given_output(linear: nn.Module, x: torch.Tensor, y: torch.Tensor, grad_fn=None) -> torch.Tensor:
    """``linear(x)`` with its value ``y`` already known (any shape holding x's rows of outputs): the LM head's
    logits computed by the head's ONNX Runtime graph, differentiated in PyTorch without its forward again.
    ``grad_fn(grad)``: d(loss)/dx where something computes it faster than ``input_grad`` (the same math)."""
    return _GivenOutput.apply(x, y.detach().reshape(*x.shape[:-1], -1).to(x.dtype),
                              grad_fn or functools.partial(input_grad, linear))


def input_grad(linear: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """d(loss)/dx of ``y = linear(x)`` from d(loss)/dy: the layer's own ``input_grad`` where it has one (a
    quantized linear reads its transposed copy), else ``grad @ W``."""
    own = getattr(linear, "input_grad", None)
    return own(grad) if own is not None else grad @ linear.weight.to(grad.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the model dtype, as the original implementation does
        x32 = upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.gate_up_proj: nn.Linear | None = None  # set by ``fuse_projections`` (runtime weight layout)

    def fuse_projections(self) -> None:
        """One linear over the concatenated gate and up weights (one GEMV per token instead of two; same
        values; the separate weights are released)."""
        if self.gate_up_proj is not None:
            return
        fused = nn.Linear(self.gate_proj.in_features, 2 * self.gate_proj.out_features,
                          bias=self.gate_proj.bias is not None, device="meta")
        fused.weight = nn.Parameter(torch.cat([self.gate_proj.weight, self.up_proj.weight]), requires_grad=False)
        if self.gate_proj.bias is not None:
            fused.bias = nn.Parameter(torch.cat([self.gate_proj.bias, self.up_proj.bias]), requires_grad=False)
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
