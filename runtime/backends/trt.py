"""TensorRT backend (TensorRT 10 API): PyTorch allocates every buffer and owns the CUDA stream.

Shapes and addresses are set only when they change; every call that reports failure is checked and the
message names the tensor and the value. Not runnable on the CPU machines this project is tested on: its
GPU test skips without tensorrt and CUDA, while the binding plan and profile choice it relies on are the
ones the ONNX Runtime path exercises (``runtime.backends.bindings``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from models.errors import UserError
from runtime.backends.base import BackendBase
from runtime.backends.bindings import (
    DEEPSTACK_INPUT,
    DEEPSTACK_OUTPUT,
    DeepStackFeed,
    hidden_view,
    rows_bindings,
    scatter_rows,
    scatter_staging,
    select_profile,
    staging_buffers,
    static_trunk_bindings,
    trunk_bindings,
    vision_bindings,
)
from runtime.cache import KVCache
from runtime.pool import head_rows, row_inputs


class TrtError(UserError):
    """TensorRT refused an engine, a shape or an address."""


class _Engine:
    def __init__(self, trt, runtime, path: Path) -> None:
        self.path = path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TrtError(f"TensorRT could not deserialize {path} (built with another TensorRT version or GPU? "
                           "rebuild it on this device)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TrtError(f"TensorRT could not create an execution context for {path.name}")
        self.trt = trt
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile = 0

    def dtype_check(self, name: str, t: torch.Tensor) -> None:
        want = self.engine.get_tensor_dtype(name)
        got = {torch.float32: self.trt.float32, torch.float16: self.trt.float16, torch.bfloat16: self.trt.bfloat16,
               torch.int64: self.trt.int64, torch.int32: self.trt.int32, torch.bool: self.trt.bool}.get(t.dtype)
        if got != want:
            raise TrtError(f"{self.path.name}: tensor {name} is {t.dtype} but the engine expects {want}")

    def use_profile(self, index: int, stream: int) -> None:
        if index != self.profile:
            if not self.context.set_optimization_profile_async(index, stream):
                raise TrtError(f"{self.path.name}: TensorRT refused optimization profile {index}")
            self.profile = index
            self.shapes.clear()
            self.addresses.clear()

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], stream: int) -> None:
        for name, t in inputs.items():
            shape = tuple(t.shape)
            if self.shapes.get(name) != shape:
                self.dtype_check(name, t)
                if not self.context.set_input_shape(name, shape):
                    raise TrtError(f"{self.path.name}: TensorRT refused shape {list(shape)} for input {name} "
                                   f"(profile {self.profile})")
                self.shapes[name] = shape
        for name, t in (*inputs.items(), *outputs.items()):
            ptr = t.data_ptr()
            if self.addresses.get(name) != ptr:
                if not self.context.set_tensor_address(name, ptr):
                    raise TrtError(f"{self.path.name}: TensorRT refused the address of tensor {name}")
                self.addresses[name] = ptr
        for name, t in outputs.items():
            want = tuple(self.context.get_tensor_shape(name))
            if want != tuple(t.shape):
                raise TrtError(f"{self.path.name}: output {name} has shape {list(want)}, buffer {list(t.shape)}")
        if not self.context.execute_async_v3(stream):
            raise TrtError(f"{self.path.name}: TensorRT execution failed")


class TrtBackend(BackendBase):
    name = "trt"
    head_major_layers = 0  # the KV cache layers it reads head-major (``KVCache.allocate``): none
    # prefill switches the context to another optimization profile between answers; whether a CUDA graph
    # captured under the decode profile stays valid after that is not verified here, so static decode
    # captures its graphs again for every answer on this backend
    graphs_outlive_prefill = False

    def __init__(self, engine_dir: Path, dtype: torch.dtype, device: str = "cuda") -> None:
        import tensorrt as trt

        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.dtype = dtype
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.runtime is None:
            raise TrtError("TensorRT could not create a runtime")
        self.vision = _Engine(trt, self.runtime, engine_dir / "vision.plan")
        self.trunk_engine = _Engine(trt, self.runtime, engine_dir / "trunk.plan")
        names = [self.trunk_engine.engine.get_tensor_name(i) for i in range(self.trunk_engine.engine.num_io_tensors)]
        self.num_layers = sum(1 for n in names if n.startswith("past_key."))
        # static dims of the DeepStack tensors (K levels, hidden), read from the engines' own tensor shapes
        ds = tuple(self.trunk_engine.engine.get_tensor_shape(DEEPSTACK_INPUT)) if DEEPSTACK_INPUT in names else ()
        self.deepstack = DeepStackFeed(int(ds[0]) if ds else 0, int(ds[3]) if ds else 0)
        vnames = [self.vision.engine.get_tensor_name(i) for i in range(self.vision.engine.num_io_tensors)]
        self.vision_levels = int(self.vision.engine.get_tensor_shape(DEEPSTACK_OUTPUT)[0]) \
            if DEEPSTACK_OUTPUT in vnames else 0
        # a third profile (S >= 1 new tokens on P >= 1 cached ones) prefills a prompt's suffix on a restored prefix,
        # and prefill in chunks; engines built before it had two, and then every prefill is one P = 0 call
        self.suffix_prefill = self.trunk_engine.engine.num_optimization_profiles >= 3
        self._hidden = torch.empty(0, device=self.device)
        self._staging: list[torch.Tensor] = []
        # requests decoded together: the decode profile's batch range (``python -m export --max-batch``), their caches
        # rows of one token-major pool passed whole, each row's length its cache_length (``trunk_rows``); the head
        # runs in PyTorch over the rows (``attach_head``). Written against the TensorRT 10 API as documented and
        # checked through the binding plan the ort backend's standard graph runs; unverified on TensorRT itself
        self.max_rows = int(self.trunk_engine.engine.get_tensor_profile_shape("inputs_embeds", 1)[2][0])
        self.batch_rows = self.max_rows > 1
        self.pool_head_major = False

    def attach_head(self, head) -> None:
        """The head the batched head call (``head_rows``) runs: PyTorch's, over the pool's rows."""
        self.head_rows = partial(head_rows, head, dtype=self.dtype, device=self.device)

    def trunk_rows(self, calls: list[tuple]) -> list[torch.Tensor]:
        """One decode step of several requests in one engine call (the decode profile, B = the rows it covers):
        ``calls`` (embeds [1,1,H], positions [3,1,1], cache), every cache a row of one token-major ``KVPool``; the
        new entries land in staging buffers and are copied into each row at its length on the device. Returns each
        request's hidden state [1,1,H], a view of the batch output. The call covers the pool's rows up to the last
        one a request holds (``KVPool.span``)."""
        pool = calls[0][2].pool
        n = pool.span
        if n > self.max_rows:
            raise TrtError(f"{n} rows are more than trunk.plan's decode profile takes ({self.max_rows}); "
                           "re-export with a larger --max-batch")
        embeds, positions, index, _ = row_inputs(calls, self.dtype, self.device, rows=n)
        h = embeds.shape[2]
        self._hidden, hidden = hidden_view(self._hidden, n, h, self.dtype, self.device)  # kept while they fit
        hidden = hidden.view(n, 1, h)
        self._staging = staging_buffers(self._staging, self.num_layers, calls[0][2], rows=n)
        inputs, outputs = rows_bindings(self.num_layers, embeds, positions, index, pool, hidden, self._staging,
                                        self.deepstack.inputs(None, 1, self.dtype, self.device, rows=n), rows=n)
        handle = self._stream()
        self.trunk_engine.use_profile(select_profile(1, pool.capacity), handle)
        self.trunk_engine.run(inputs, outputs, handle)
        scatter_rows(self.num_layers, pool, index, self._staging)
        return [hidden[cache.row:cache.row + 1] for _, _, cache in calls]

    @staticmethod
    def _stream() -> int:
        # the current stream at call time: inside CUDA-graph capture that is the capture stream
        return torch.cuda.current_stream().cuda_stream

    def trunk(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              deepstack: torch.Tensor | None = None) -> torch.Tensor:
        s = embeds.shape[1]
        self._hidden, hidden = hidden_view(self._hidden, s, embeds.shape[2], self.dtype, self.device)
        extra = self.deepstack.inputs(deepstack, s, self.dtype, self.device)
        inputs, outputs = trunk_bindings(self.num_layers, embeds.contiguous(), positions.contiguous(), cache, hidden,
                                         extra)
        handle = self._stream()
        self.trunk_engine.use_profile(select_profile(s, cache.length), handle)
        self.trunk_engine.run(inputs, outputs, handle)
        return hidden

    def trunk_step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   index: torch.Tensor) -> torch.Tensor:
        """Static decode of one token: the decode profile at one fixed shape (P = the cache's capacity), the
        same addresses every step, so TensorRT plans once and the call can be captured in a CUDA graph
        (after one eager call, which the static loop's warm-up makes)."""
        self._hidden, hidden = hidden_view(self._hidden, 1, embeds.shape[2], self.dtype, self.device)
        self._staging = staging_buffers(self._staging, self.num_layers, cache)
        inputs, outputs = static_trunk_bindings(self.num_layers, embeds.contiguous(), positions.contiguous(), index,
                                                cache, hidden, self._staging,
                                                self.deepstack.inputs(None, 1, self.dtype, self.device))
        handle = self._stream()
        self.trunk_engine.use_profile(select_profile(1, cache.capacity), handle)
        self.trunk_engine.run(inputs, outputs, handle)
        scatter_staging(self.num_layers, cache, index, self._staging)
        return hidden

    def encode_vision(self, inputs: dict[str, torch.Tensor], tokens: int,
                      hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = torch.empty(tokens, hidden_size, dtype=self.dtype, device=self.device)
        deepstack = torch.empty(self.vision_levels, tokens, hidden_size, dtype=self.dtype, device=self.device) \
            if self.vision_levels else None
        ins, outs = vision_bindings({k: v.to(self.device).contiguous() for k, v in inputs.items()}, embeds, deepstack)
        self.vision.run(ins, outs, self._stream())
        return embeds, deepstack
