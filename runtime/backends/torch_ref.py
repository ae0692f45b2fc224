"""PyTorch backend: the trunk and vision encoder run as the models' PyTorch modules.

The modules are filled from the export's own graphs (``model_from_export``: the ONNX initializers, named after
the modules at export; a quantized trunk keeps its low-bit weights, packed for PyTorch's int4/int8 kernels on
CUDA), so an export folder alone runs here: the production path on a GPU without TensorRT. Given a checkpoint
directory instead (``model_from_checkpoint``), it runs the checkpoint's weights: the parity reference.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from runtime.backends.base import BackendBase
from runtime.cache import KVCache
from runtime.pool import head_rows, run_rows


def model_from_export(export_dir: Path, manifest: dict, dtype: torch.dtype, device) -> object:
    """The family's model with its vision encoder and trunk filled from the export's graphs on ``device`` (the
    decoder's embedding, last layer and LM head stay unmaterialized: the head comes from head.safetensors).
    The report of what was loaded is ``model.loaded``."""
    from export.graph_weights import fill_from_graph
    from models.registry import family

    fam = family(manifest["model_type"])
    cfg = fam.Config.from_stored(manifest["config"])
    with torch.device("meta"):
        model = fam.Model(cfg)
    specs = fam.export_spec(model, dtype, "meta")  # the modules the graphs were exported from (trunk fused)
    quantized = manifest["quantization"].get("scheme", "none") != "none"
    model.loaded = {spec.name: fill_from_graph(spec.module, Path(export_dir) / f"{spec.name}.onnx", dtype, device,
                                               quantized=quantized and spec.name == "trunk") for spec in specs}
    model.reset_buffers(torch.device(device))
    return model.eval().requires_grad_(False)


def compile_options(module: torch.nn.Module) -> dict:
    """Inductor settings for compiling ``module``'s decode step. Where it holds int8 rows widened per call
    (``models.quantized.Int8Rows`` on CUDA), coordinate descent tuning: under it inductor computes a one-row
    matmul as a reduction (``torch._inductor.decomposition.mm``) into which it fuses the widening, so a step
    reads each weight's byte once instead of widening a bf16 copy and reading that. Otherwise inductor's
    defaults (what the bf16 and int4 rows were measured with). Not yet measured on a GPU (docs/benchmarks.md)."""
    from models.quantized import Int8Rows, QuantLinear

    widened = any(isinstance(k, Int8Rows) and not k.fused for m in module.modules() if isinstance(m, QuantLinear)
                  for k in m.packed.values())
    return {"coordinate_descent_tuning": True} if widened else {}


class TorchBackend(BackendBase):
    name = "torch"
    head_major_layers = 0  # the KV cache layers it reads head-major (``KVCache.allocate``): none
    # dynamic decode: the running requests' caches are rows of one pool, decoded together (``trunk_rows``,
    # ``head_rows``: the static step's form with an index per row, over the rows' filled length). A request alone is
    # one row (pool_min_rows 1): PyTorch's own CPU matmuls read a one-row product about twice as fast as a two-row
    # one (measured on the bench fp32 export: a lone request decoded 6.5-8.5 tokens/s as one row, 3.9-4.2 as one of
    # two); rows together then equal each alone to float rounding (one-row and several-row kernels round
    # differently; so do oneDNN's over packed weights, ``pack_linears``, at some shapes)
    batch_rows = True
    batch_static = True  # static decode too: the same calls over the pool's whole buffers (``static_rows``)

    def __init__(self, model, dtype: torch.dtype, device: str = "cpu") -> None:
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = model.trunk.num_layers
        self._step = model.trunk.step
        self.compiled = False
        self.head = None
        self.fixed = None  # static decode of several requests together (``static_rows``): a RowGraphs
        self.packed_linears = 0  # linears run through oneDNN over packed weights (``pack_linears``)

    def pack_linears(self, head) -> None:
        """On CPU in float32: the trunk's and the head's linears through oneDNN over weights packed once
        (``models.packed``: x1.27 the step's matmuls at 4 rows on the bench shape, faster at one row too, than
        ONNX Runtime's; PyTorch's own CPU matmul was slower than both). The trunk's original weights are released
        (it never runs a backward); the head keeps them beside the packed copy (V-Reason's update backpropagates
        through its last layer and reads the LM head's weight). ``packed_linears``: how many were packed (0 where
        ``models.packed.usable`` says no)."""
        from models.packed import pack_linears, usable

        if usable(self.device, self.dtype):
            self.packed_linears = pack_linears(self.model.trunk, keep=False) + pack_linears(head, keep=True)

    def attach_head(self, head) -> None:
        """The head the batched head call (``head_rows``) runs."""
        self.head = head
        self.head_rows = partial(head_rows, head, dtype=self.dtype, device=self.device)

    def static_rows(self, cuda_graphs: bool) -> None:
        """Static decode of the running requests together: ``trunk_rows`` and ``head_rows`` run over the pool's whole
        buffers (every row, the whole capacity: fixed shapes while the buffers stay), replayed as CUDA graphs per
        pool shape on CUDA (``runtime.static.RowGraphs``; the pool's rows grow in powers of two). V-Reason's and
        Lite's updates run eagerly between the replays (``VReason.update_rows``)."""
        from runtime.static import RowGraphs

        self.fixed = RowGraphs(cuda_graphs and self.device.type == "cuda")
        self.head_rows = partial(head_rows, self.head, dtype=self.dtype, device=self.device, fixed=self.fixed)

    @torch.no_grad()
    def trunk_rows(self, calls: list[tuple]) -> list[torch.Tensor]:
        """One decode step of several requests (``Trunk.step`` over the rows of their pool up to the last one held,
        ``KVPool.span``, each row's entries written at its length; static decode: every row over the whole
        capacity, ``static_rows``); each request's hidden state [1,1,H]."""
        pool = calls[0][2].pool
        views = [pool.token_major(i) for i in range(self.num_layers)]  # [rows, capacity, kv, hd] each
        hidden = run_rows("trunk", calls, self.dtype, self.device, self.fixed,
                          lambda x, p, i, end: self._step(x, p, [k[:len(x), :end] for k, _ in views],
                                                          [v[:len(x), :end] for _, v in views], i))
        return [hidden[call[2].row:call[2].row + 1] for call in calls]

    def compile_step(self) -> None:
        """torch.compile the static decode step (inductor; compiled on first use, per shape)."""
        if not self.compiled:
            self._step = torch.compile(self.model.trunk.step, dynamic=False,
                                       options=compile_options(self.model.trunk) or None)
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
