"""Weight-only quantized layers of the PyTorch head: linears in ONNX Runtime's MatMulNBits layout, and an
embedding table stored int8 per row.

MatMulNBits layout (ONNX Runtime's contrib operator, also what its quantizer writes): a weight W [N, K]
(N outputs, K inputs) is cut along K into blocks of ``block_size``; ``codes`` uint8 [N, blocks, block_size *
bits / 8] (4 bits: two values per byte, the first in the low nibble), ``scales`` [N, blocks] (or flat),
``zero_points`` absent (symmetric: 8 for 4 bits, 128 for 8 bits), uint8 (4 bits: packed two per byte along
the blocks) or float (HQQ). W[n, k] = (code - zero_point) * scale of k's block.

On CPU a ``QuantLinear`` runs ONNX Runtime's MatMulNBits kernel (packed weights read as they are; measured on
the bench shape's 151936 x 896 LM head, 2 cores: int4 2.1 ms, int8 5.1 ms, fp32 PyTorch 21 ms), and its
backward (V-Reason's d(logits)/d(values) needs input gradients only, the weights are frozen) runs the same
kernel over a second copy of W^T quantized along N: the gradient is that of a weight equal to W up to the
quantization noise, not bit-exactly the forward's (PyTorch's own low-bit CPU kernels measured slower than
fp32 here: int8 57 ms, int4 122 ms; dequantizing in the backward: 288 ms).

On CUDA (``QuantLinear.pack``) the layer keeps only packed low-bit weights in GPU memory and takes float
activations (no int8 rounding of activations: that is ONNX Runtime CPU's numerics, not the GPU's):
- int4: PyTorch's own int4 weight-only kernel (``aten._weight_int4pack_mm``, the tinygemm kernel every CUDA
  build carries), bf16 activations, one scale per block (the export's blocks, 32 to 256 wide) and zero 0 for
  the symmetric codes; a layer whose shape the kernel cannot take (int4 blocks of 16) is refused at load with
  one line, never rebuilt from its codes on every call. Packing converts a slice of rows at a time
  (``kernel_nibbles``): the transient device memory is one slice beside the packed result.
- int8: int8 rows with one scale per output row, widened to the activation dtype inside each call (see
  ``Int8Rows`` for why not PyTorch's fused int8 kernel). The export's int8 codes have one scale per block, so
  they are requantized per row at load (a second rounding, at most half a row step).
The backward (V-Reason's d(logits)/d(values)) runs the same kernel over the packed copy of W^T.
On CPU in another dtype than fp32 the layer holds a dequantized copy (correct, without the memory saving).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IR_VERSION = 10  # ONNX IR of the graphs built here: what ONNX Runtime 1.18 and later read (opset 21 needs 10)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, blocks, blob] -> int16 [N, blocks * block_size] of the stored (unsigned) codes."""
    c = codes.to(torch.int16)
    if bits == 8:
        return c.reshape(c.shape[0], -1)
    return torch.stack((c & 0xF, c >> 4), dim=-1).reshape(c.shape[0], -1)


def zero_point_values(zero_points: torch.Tensor | None, bits: int, n: int, blocks: int,
                      device=None) -> torch.Tensor:
    """[N, blocks] zero points as float (the symmetric default when absent)."""
    if zero_points is None:
        return torch.full((n, blocks), float(1 << (bits - 1)), device=device)
    if zero_points.dtype.is_floating_point:
        return zero_points.float().reshape(n, blocks)
    z = zero_points.to(torch.int16).reshape(n, -1)
    if bits == 4:
        z = torch.stack((z & 0xF, z >> 4), dim=-1).reshape(n, -1)
    return z[:, :blocks].float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int,
               block_size: int, k: int) -> torch.Tensor:
    """The float32 weight [N, K] a MatMulNBits weight stands for."""
    n = codes.shape[0]
    q = unpack_codes(codes, bits).float()
    blocks = q.shape[1] // block_size
    s = scales.float().reshape(n, blocks)
    z = zero_point_values(zero_points, bits, n, blocks, codes.device)
    w = (q.view(n, blocks, block_size) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(n, -1)[:, :k].contiguous()


def fake_quantize_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """What ONNX Runtime's MatMulNBits does to its input at accuracy level 4: each block of ``block_size``
    along the last axis rounded to int8 with its own scale (max |x| / 127). With dequantized weights this
    reproduces the kernel's result to float rounding (measured: 1e-6 of the output's scale, where float
    activations differ by 1e-2); the torch backend runs it to compute what the ort backend computes."""
    shape = x.shape
    xb = x.reshape(-1, shape[-1] // block_size, block_size)
    amax = xb.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))  # computed and multiplied as the kernel does
    return (torch.round(xb * inverse) * (amax / 127)).reshape(shape)


def matmul_nbits(x: str, y: str, prefix: str, codes, scales, zero_points, bits: int, block_size: int, k: int,
                 n: int, accuracy_level: int):
    """A MatMulNBits node y = x @ W^T and its weight tensors keyed by initializer name (``prefix`` + codes,
    scales, zero_points)."""
    from onnx import helper

    arrays = {f"{prefix}codes": codes, f"{prefix}scales": scales,
              **({f"{prefix}zero_points": zero_points} if zero_points is not None else {})}
    node = helper.make_node("MatMulNBits", [x, *arrays], [y], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=accuracy_level)
    return node, arrays


def _nbits_session(codes, scales, zero_points, bits: int, block_size: int, k: int, n: int, accuracy_level: int):
    """An ONNX Runtime session computing x [M, K] @ W^T for one MatMulNBits weight, reading the weight arrays
    themselves (``handed_session``; the caller keeps them alive). Returns (session, what must outlive it)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node, arrays = matmul_nbits("x", "y", "", codes, scales, zero_points, bits, block_size, k, n, accuracy_level)
    graph = helper.make_graph(
        [node], "matmul_nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=IR_VERSION)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return handed_session(model, arrays, opts)


PLACEHOLDER = "handed-over.bin"  # the file a placeholder initializer names: empty, never read


def _placeholder(name: str, t: torch.Tensor):
    """An initializer declared without its data (an external reference to an empty placeholder file), for
    ``handed_session`` to hand ONNX Runtime the tensor itself in its place."""
    from onnx import TensorProto, helper

    proto = TensorProto()
    proto.name = name
    proto.dims.extend(t.shape)
    proto.data_type = helper.np_dtype_to_tensor_dtype(t.numpy().dtype)
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(t.numel() * t.element_size()))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


def handed_session(model, arrays: dict[str, torch.Tensor], opts, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session of ``model`` with ``arrays`` (CPU tensors, by initializer name; ``model`` names them
    without holding them) as its initializers, read from the tensors themselves: the model declares them as
    placeholders and ONNX Runtime is handed the tensors (``add_initializer``: it uses the caller's buffer
    instead of deserializing one). It then holds only its prepacked form of them: an initializer
    serialized into the model stays held as well (the bench LM head's int4 MatMulNBits, 81 MB of codes and
    scales: 109-113 MB resident for the session against 192 MB with the data serialized, 209 MB with ONNX Runtime
    owning it). An ONNX Runtime that will not take the placeholders gets the data serialized (the same session,
    more memory). Returns (session, the values that must outlive it)."""
    import tempfile

    import onnxruntime as ort
    from onnx import numpy_helper

    values = {name: ort.OrtValue.ortvalue_from_numpy(a.numpy()) for name, a in arrays.items()}
    for name, v in values.items():
        opts.add_initializer(name, v)
    inits = model.graph.initializer
    inits.extend(_placeholder(name, a) for name, a in arrays.items())
    try:  # loaded from a file beside its (empty) placeholder: the folder is only read while loading
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / PLACEHOLDER).touch()
            (Path(folder) / "model.onnx").write_bytes(model.SerializeToString())
            return ort.InferenceSession(str(Path(folder) / "model.onnx"), opts, providers=list(providers)), values
    except Exception:  # onnxruntime's own error types; the serialized form is the one every version reads
        del inits[len(inits) - len(arrays):]
        inits.extend(numpy_helper.from_array(a.numpy(), name) for name, a in arrays.items())
        return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers)), values


def rtn_quantize(weight: torch.Tensor, bits: int, block_size: int) -> dict[str, torch.Tensor]:
    """W [N, K] in MatMulNBits layout (symmetric, no zero points), rounded as ONNX Runtime's quantizer rounds
    it: each block's value of largest magnitude maps to -2^(bits-1) (so a scale may be negative). Used where no
    ONNX graph is at hand (the synthetic benchmark); a test checks it against the quantizer, code for code."""
    w = weight.detach().float()
    n, k = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        w = torch.nn.functional.pad(w, (0, blocks * block_size - k))
    wb = w.view(n, blocks, block_size)
    lo, mid = -(1 << (bits - 1)), 1 << (bits - 1)
    peak = wb.gather(-1, wb.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [N, blocks], signed
    scales = peak / lo
    inverse = torch.where(scales != 0, 1 / scales, torch.zeros_like(scales))
    codes = (torch.round(wb * inverse.unsqueeze(-1)).clamp(lo, mid - 1) + mid).to(torch.uint8)
    if bits == 4:
        codes = codes.view(n, blocks, block_size // 2, 2)
        codes = codes[..., 0] | (codes[..., 1] << 4)
    return {"codes": codes.contiguous(), "scales": scales.contiguous()}


def int4_inner_tiles(n: int, k: int, block_size: int) -> int | None:
    """innerKTiles for PyTorch's int4 kernel on an [N, K] weight, or None where the kernel cannot take it
    (N a multiple of 8, K of 32, blocks of 32 to 256)."""
    if n % 8 or block_size not in (32, 64, 128, 256) or k % block_size:
        return None
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


PACK_ROWS = 8192  # rows of a weight converted at a time while packing: bounded transient device memory


def kernel_nibbles(codes: torch.Tensor, k: int, device) -> torch.Tensor:
    """uint8 [N, K / 2] on ``device``: the int4 kernel's input (two codes per byte, the even column in the high
    nibble) from MatMulNBits codes (the even column in the low nibble): each byte's nibbles swapped, a slice of
    rows at a time. Transient memory: one slice, against whole-matrix int16 and uint8 copies of the codes
    unpacked one per byte (about 1.6 GB for a 151936 x 3584 LM head)."""
    n = codes.shape[0]
    flat = codes.reshape(n, -1)
    if flat.shape[1] * 2 != k:
        raise ValueError(f"int4 codes of {flat.shape[1] * 2} columns for K = {k}")
    out = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
    for a in range(0, n, PACK_ROWS):
        part = flat[a: a + PACK_ROWS].to(device)
        out[a: a + PACK_ROWS] = (part << 4) | (part >> 4)
    return out


class Int4Packed:
    """x [M, K] @ W^T with W held as PyTorch's packed int4 layout (``aten._convert_weight_to_int4pack``)."""

    kernel = "int4 aten._weight_int4pack_mm"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 block_size: int, k: int, tiles: int, device) -> None:
        n = codes.shape[0]
        self.cpu = torch.device(device).type == "cpu"  # the CPU twin of the kernel (tests of the layout on CPU)
        if self.cpu:
            u = unpack_codes(codes.to(device), 4)[:, :k]  # [N, K] codes 0..15
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), tiles)
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack(kernel_nibbles(codes, k, device), tiles)
        s = scales.to(device).float().reshape(n, -1)[:, : k // block_size]  # [N, blocks]
        z = zero_point_values(zero_points, 4, n, s.shape[1], device)
        # the kernel computes (code - 8) * scale + zero; MatMulNBits (code - z) * scale
        self.scales_and_zeros = torch.stack((s, (8 - z) * s), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.block_size = block_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(x.to(torch.bfloat16), self.packed, self.block_size, self.scales_and_zeros)
        return y.to(x.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


class Int8Rows:
    """x [M, K] @ W^T with W as int8 rows and one scale per row. On CUDA the rows are widened to the activation
    dtype inside the call (``F.linear(x, rows.to(dtype)) * scales``): PyTorch's fused ``torch._weight_int8pack_mm``
    exists on CUDA in 2.11 but measured 15.5 decode tokens/s at the Qwen2.5-VL-7B shape on an H200, against 146
    for bf16. Eager, a call writes and reads a widened copy (about 5 bytes of traffic per weight against bf16's 2);
    the compiled trunk step asks inductor to fuse the widening into a one-row reduction
    (``runtime.backends.torch_ref.compile_options``), which reads each weight's byte once. Neither form is measured
    on a GPU yet. On CPU the fused kernel runs."""

    def __init__(self, rows: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, device) -> None:
        self.rows = rows.to(device)  # [N, K] int8
        self.scales = scales.to(device, dtype)  # [N]
        self.fused = torch.device(device).type == "cpu"
        self.kernel = "int8 torch._weight_int8pack_mm" if self.fused else "int8 rows widened per call"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if self.fused:
            return torch._weight_int8pack_mm(x, self.rows, s)
        return nn.functional.linear(x, self.rows.to(x.dtype)) * s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.scales))


def pack_for_cuda(codes, scales, zero_points, bits: int, block_size: int, k: int, dtype: torch.dtype, device,
                  name: str = "a linear"):
    """The GPU form of one MatMulNBits weight [N, K] (see the module docstring). An int4 weight the kernel cannot
    take is refused (``CheckpointError``), never run by rebuilding the whole float weight on every call."""
    if bits == 4:
        tiles = int4_inner_tiles(codes.shape[0], k, block_size)
        if tiles is None:
            from models.errors import CheckpointError

            raise CheckpointError(
                f"{name}: int4 in blocks of {block_size} over a [{codes.shape[0]}, {k}] weight, which PyTorch's int4 "
                "GPU kernel cannot take (blocks of 32, 64, 128 or 256, outputs a multiple of 8, inputs a multiple "
                "of the block); re-export with --block-size 32 or larger, or run --backend ort")
        return Int4Packed(codes, scales, zero_points, block_size, k, tiles, device)
    parts = []
    for a in range(0, codes.shape[0], 8192):  # dequantized a slice of rows at a time: bounded transient memory
        part = slice(a, a + 8192)
        zp = None if zero_points is None else zero_points.reshape(codes.shape[0], -1)[part]
        w = dequantize(codes[part].to(device), scales.reshape(codes.shape[0], -1)[part].to(device),
                       None if zp is None else zp.to(device), bits, block_size, k)
        parts.append(QuantEmbedding.quantize(w))  # int8 per row, as the embedding table is stored
    return Int8Rows(torch.cat([p["codes"] for p in parts]), torch.cat([p["scales"] for p in parts]), dtype, device)


class _LowBitMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._run("forward", x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.layer.input_grad(grad), None


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored weight-only quantized (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int,
                 tensors: dict[str, torch.Tensor], backward_block_size: int | None = None,
                 accuracy_level: int = 4) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.block_size = in_features, out_features, bits, block_size
        self.backward_block_size = backward_block_size
        self.accuracy_level = accuracy_level
        for name in ("codes", "scales", "zero_points", "bwd_codes", "bwd_scales", "bwd_zero_points"):
            t = tensors.get(name)
            self.register_buffer(name, t.contiguous() if t is not None else None)
        self.bias = nn.Parameter(tensors["bias"], requires_grad=False) if tensors.get("bias") is not None else None
        self._sessions: dict = {}
        self._dense: torch.Tensor | None = None
        self.packed: dict = {}  # CUDA: "forward" (and "backward") kernels over packed weights, set by ``pack``

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] the stored codes stand for."""
        if self.codes is None:
            raise RuntimeError("the codes were packed for the GPU kernels and released")
        return dequantize(self.codes, self.scales, self.zero_points, self.bits, self.block_size, self.in_features)

    def pack(self, device, dtype: torch.dtype, name: str = "a linear") -> QuantLinear:
        """Pack the weights (and the transposed copy, when stored) for the GPU kernels on ``device`` and release
        the MatMulNBits codes: one low-bit copy of each weight stays in GPU memory. ``name``: the linear's path,
        for the one line that refuses a weight the kernels cannot take."""
        self.packed["forward"] = pack_for_cuda(self.codes, self.scales, self.zero_points, self.bits, self.block_size,
                                               self.in_features, dtype, device, name)
        if self.bwd_codes is not None:
            self.packed["backward"] = pack_for_cuda(self.bwd_codes, self.bwd_scales, self.bwd_zero_points, self.bits,
                                                    self.backward_block_size, self.out_features, dtype, device,
                                                    f"{name} (its transposed copy, for V-Reason's backward)")
        for name in ("codes", "scales", "zero_points", "bwd_codes", "bwd_scales", "bwd_zero_points"):
            setattr(self, name, None)
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().to(device, dtype), requires_grad=False)
        return self

    def packed_bytes(self) -> int:
        return sum(k.nbytes() for k in self.packed.values())

    def forward_bytes(self) -> int:
        """Bytes one forward reads: the packed (or stored) forward weights and the bias."""
        def size(*ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        w = self.packed["forward"].nbytes() if self.packed else size(self.codes, self.scales, self.zero_points)
        return w + size(self.bias)

    def kernels(self) -> set[str]:
        return {k.kernel for k in self.packed.values()}

    def nbits_args(self, which: str = "forward") -> tuple:
        """(codes, scales, zero_points, bits, block_size, K, N, accuracy_level) of the forward weights or of the
        transposed copy the backward reads, as ``matmul_nbits`` takes them."""
        if which == "forward":
            return (self.codes, self.scales, self.zero_points, self.bits, self.block_size, self.in_features,
                    self.out_features, self.accuracy_level)
        return (self.bwd_codes, self.bwd_scales, self.bwd_zero_points, self.bits, self.backward_block_size,
                self.out_features, self.in_features, self.accuracy_level)

    def _session(self, which: str):
        if which not in self._sessions:
            self._sessions[which] = _nbits_session(*self.nbits_args(which))
        return self._sessions[which][0]

    def _run(self, which: str, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.packed:
            kernel = self.packed.get(which)
            if kernel is None:  # an export without the transposed copy: no backward on the GPU path
                raise RuntimeError("this quantized head has no transposed weights for the backward; re-export")
            y = kernel(x.reshape(-1, shape[-1]))
            return y.view(*shape[:-1], y.shape[-1])
        if which == "backward" and self.bwd_codes is None:
            return x @ self.dequantized().to(x.dtype)  # an export without the transposed copy: slow, exact
        flat = x.detach().reshape(-1, shape[-1]).contiguous().numpy()
        y = torch.from_numpy(self._session(which).run(None, {"x": flat})[0])
        return y.view(*shape[:-1], y.shape[-1])

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """d(loss)/dx from d(loss)/dy (``grad @ W``): the transposed copy's kernel where ``forward`` runs the
        low-bit kernels, else the dequantized weights."""
        if self.packed or (grad.device.type == "cpu" and grad.dtype == torch.float32):
            return self._run("backward", grad)
        return grad @ self.dequantized().to(grad.device, grad.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed or (x.device.type == "cpu" and x.dtype == torch.float32):
            # autograd only where a gradient is wanted (V-Reason's update); a plain call otherwise, which
            # torch.compile traces as the kernel call it is
            y = _LowBitMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self._run("forward", x)
        else:  # CPU in another dtype: the ONNX Runtime kernel's math in PyTorch (dequantized copy, int8 activations)
            if self._dense is None or self._dense.device != x.device or self._dense.dtype != x.dtype:
                self._dense = self.dequantized().to(x.device, x.dtype)
            if self.in_features % self.block_size == 0:
                x = fake_quantize_activations(x, self.block_size)
            y = nn.functional.linear(x, self._dense)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kernels = f", kernels={sorted(self.kernels())}" if self.packed else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block={self.block_size}{kernels}"


class QuantEmbedding(nn.Module):
    """An embedding table stored int8 per row: row = codes[row] * scale[row] (one row read per token)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return {"codes": codes, "scales": scales}

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scales[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


def backward_block(n: int, block_size: int) -> int:
    """Block size of a linear's transposed copy (its blocks run along the outputs, N): the forward's where it
    divides N, else the largest of 128, 64 and 32 that does (what the GPU's int4 kernel takes); 16 only where
    none does, which the GPU path then refuses at load."""
    return next((b for b in (block_size, 128, 64, 32, 16) if n % b == 0), block_size)


def install_quantized(module: nn.Module, state: dict[str, torch.Tensor], linears: list[str], bits: int,
                      block_size: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Replace ``module``'s linears named in ``linears`` and its ``embed_tokens`` by quantized ones built from a
    quantized export's ``state``; returns the rest of the state (norms and other float tensors)."""
    rest = dict(state)
    for name in linears:
        lin = module.get_submodule(name)
        parts = {k: rest.pop(f"{name}.{k}") for k in ("codes", "scales", "zero_points", "bwd_codes", "bwd_scales",
                                                      "bwd_zero_points", "bias") if f"{name}.{k}" in rest}
        if "codes" not in parts:
            from models.errors import CheckpointError
            raise CheckpointError(f"the quantized head lacks {name}.codes; re-export")
        if parts.get("bias") is not None:
            parts["bias"] = parts["bias"].to(device, dtype)
        layer = QuantLinear(lin.in_features, lin.out_features, bits, block_size, parts,
                            backward_block(lin.out_features, block_size))
        module.set_submodule(name, layer.pack(device, dtype, name) if torch.device(device).type == "cuda" else layer)
    if "embed_tokens.codes" in rest:
        module.embed_tokens = QuantEmbedding(rest.pop("embed_tokens.codes").to(device),
                                             rest.pop("embed_tokens.scales").to(device, dtype))
    return rest
