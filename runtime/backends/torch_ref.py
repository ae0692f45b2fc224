"""PyTorch reference backend: the trunk and vision encoder run as the models' PyTorch modules.

It needs the original checkpoint (the export holds the trunk only as ONNX/TensorRT); by default the one
the manifest records as the export's source.
"""

from __future__ import annotations

import torch

from runtime.cache import KVCache


class TorchBackend:
    name = "torch"

    def __init__(self, model, dtype: torch.dtype, device: str = "cpu") -> None:
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = model.trunk.num_layers
        self._step = model.trunk.step
        self.compiled = False

    def compile_step(self) -> None:
        """torch.compile the static decode step (inductor; compiled on first use, per shape)."""
        if not self.compiled:
            self._step = torch.compile(self.model.trunk.step, dynamic=False)
            self.compiled = True

    @torch.no_grad()
    def trunk_step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   index: torch.Tensor) -> torch.Tensor:
        """Static decode of one token (``Trunk.step``): entries written at the device index ``index``."""
        n = self.num_layers
        return self._step(embeds, positions, cache.keys[:n], cache.values[:n], index)

    @torch.no_grad()
    def trunk(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              deepstack: torch.Tensor | None = None) -> torch.Tensor:
        past = [t for i in range(self.num_layers) for t in cache.past(i)]
        extra = {} if deepstack is None else {"deepstack": deepstack}  # only DeepStack trunks take it
        hidden, *new = self.model.trunk(embeds, positions, *past, **extra)
        for i in range(self.num_layers):
            k, v = cache.slot(i, embeds.shape[1])
            k.copy_(new[2 * i])
            v.copy_(new[2 * i + 1])
        return hidden

    @torch.no_grad()
    def encode_vision(self, inputs: dict[str, torch.Tensor], tokens: int,
                      hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model.visual(*inputs.values())
        return out if isinstance(out, tuple) else (out, None)
