"""ONNX Runtime backend: IO binding straight into the torch-owned cache buffers (CPU, or CUDA with
onnxruntime-gpu)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from runtime.backends.base import BackendBase
from runtime.backends.bindings import (
    DEEPSTACK_INPUT,
    DEEPSTACK_OUTPUT,
    DeepStackFeed,
    head_major_bindings,
    head_major_rows_bindings,
    hidden_view,
    rows_bindings,
    scatter_rows,
    scatter_staging,
    staging_buffers,
    static_trunk_bindings,
    trunk_bindings,
    vision_bindings,
)
from runtime.backends.ort_graph import bind, run_bound
from runtime.cache import KVCache
from runtime.pool import head_rows, kept_for_rows, row_inputs

STEP_BINDINGS = 8  # one-token bindings kept (one per running request's cache)


class OrtBackend(BackendBase):
    name = "ort"
    # rows a batched call covers at least (``attach_head`` sets it): one where a row's numbers do not depend on how
    # many rows a call has, else two, so that a request alone is decoded as one row of two, as it is with others.
    # ONNX Runtime's MatMulNBits takes another path for a single row, whose rounding differs (measured on the bench
    # int4 export: entropies 5e-4 apart, greedy tokens apart from the 8th of 32), and so does a float matmul over a
    # weight that is not prepacked (the head graph's, unless ``packed``: logits 2e-6 apart); from two rows on each
    # row's numbers do not depend on the others. Two rows cost a lone request a second row of KV cache and, at fp32,
    # 15% of its decode rate (measured on the bench export, 2 cores: 1 row / 2 rows x1.18, 8 alternated requests).
    # The fused trunk's prepacked matmuls and attention, and the packed head graph, give a row the same hidden states
    # and logits in a call of one row as of several (the entropy's sums over the vocabulary to float rounding: ONNX
    # Runtime splits one row's reduction across its threads): one row is enough there
    pool_min_rows = 2
    # its batched calls already take the pool's whole buffers, each row's length an input: fixed shapes while the
    # pool's buffers stay, so static decode runs requests together through the same calls (``static_rows``)
    batch_static = True

    def __init__(self, engine_dir: Path, dtype: torch.dtype, device: str = "cpu", threads: int = 0,
                 text=None, trunk_graph: str = "auto") -> None:
        """``text`` (the family's text config) and ``trunk_graph``: on CPU, "fused" runs the ORT-only form of the
        trunk graph (``ort_trunk``) where it can restate it, "standard" the exported graph, "auto" the fused form
        where the export keeps its weights in ``trunk.onnx.data`` (there it costs no memory); ``self.trunk_form``
        says which ran ("fused", or "standard" with the reason). The fused form reads the trunk layers' KV
        cache head-major: ``self.head_major_layers`` says how many layers a cache for it stores so
        (``KVCache.allocate``)."""
        import onnxruntime as ort

        if dtype == torch.bfloat16:
            from models.errors import UserError
            raise UserError("the ort backend cannot run bf16 exports (no bf16 kernels); export fp16 or fp32, "
                            "or use the trt backend")
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                from models.errors import UserError
                raise UserError("device cuda with the ort backend needs onnxruntime-gpu (pip install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        self.device = torch.device(device)
        self.dtype = dtype
        if trunk_graph not in ("auto", "fused", "standard"):
            from models.errors import UserError
            raise UserError(f"ort_trunk {trunk_graph!r}: expected auto, fused or standard")
        self.vision = _session(ort, engine_dir / "vision.onnx", options(threads), providers)
        self.trunk_session, self.trunk_form = None, "standard"
        from runtime.backends import ort_trunk

        if trunk_graph == "standard" or text is None:
            pass
        elif device != "cpu":
            self.trunk_form = "standard (the fused form is for CPU)"
        elif trunk_graph == "auto" and not ort_trunk.external_weights(engine_dir / "trunk.onnx"):
            self.trunk_form = "standard (the graph holds its weights inline: the fused form would cost memory)"
        else:
            try:
                self.trunk_session = ort_trunk.session(engine_dir / "trunk.onnx", text, options(threads), providers)
                self.trunk_form = "fused"
            except ort_trunk.Unsupported as e:
                self.trunk_form = f"standard ({e})"
        if self.trunk_session is None:
            self.trunk_session = _session(ort, engine_dir / "trunk.onnx", options(threads), providers)
        trunk_inputs = {i.name: i.shape for i in self.trunk_session.get_inputs()}
        self.num_layers = sum(1 for n in trunk_inputs if n.startswith(("past_key.", "cache_key.")))
        # the fused form's attention (GroupQueryAttention) reads and writes the cache head-major: the trunk's
        # layers, and the head's (its graph takes the same layout, ``attach_head``). Either form decodes the running
        # requests together (``trunk_rows``), their caches rows of one pool: head-major for the fused form, token-major
        # for the standard graph (its past inputs are [rows, capacity, kv, hd], each row's length its cache_length)
        fused = self.trunk_form == "fused"
        self.head_major_layers = self.num_layers + 1 if fused else 0
        self.batch_rows = True
        self.pool_head_major = fused
        # the batch bindings (``trunk_rows``), one per number of rows a call covers, kept while the pool's buffers stay
        self._rows: dict[tuple, _Rows] = {}
        ds = trunk_inputs.get(DEEPSTACK_INPUT)
        self.deepstack = DeepStackFeed(int(ds[0]) if ds else 0, int(ds[3]) if ds else 0)
        out = {o.name: o.shape for o in self.vision.get_outputs()}
        self.vision_levels = int(out[DEEPSTACK_OUTPUT][0]) if DEEPSTACK_OUTPUT in out else 0
        self._hidden = torch.empty(0)
        self._staging: list[torch.Tensor] = []
        # the fused form's one-token bindings, one per cache, kept while the caches are the same (the engine's
        # running requests take turns: each keeps its own); the least recently used goes past STEP_BINDINGS
        self._steps: OrderedDict[tuple, _Step] = OrderedDict()
        self.threads = threads
        # PyTorch's work between this backend's calls (embedding, entropy, sampling, the controller) on one
        # thread: an OpenMP worker spins for milliseconds after each parallel op and would take a core from
        # the next graph run (``Loop.threads``); the engine runs the requests' whole work so (``Engine.submit``),
        # and its thread then holds no OpenMP workers to slow a torch backend's in the same process
        # (``runtime.engine.apart``)
        self.torch_threads = 1 if device == "cpu" else 0
        self.base_head = None  # the head as an ONNX Runtime graph, for steps without autograd (Loop.head_step)

    def attach_head(self, head, batch: bool = False, quantized: bool = False) -> None:
        """Run ``head``'s base forward (no controller) in ONNX Runtime too, where ``ort_head`` supports it (fp32 on
        CPU): one session run instead of ~30 PyTorch ops and one call per quantized linear (measured on the bench
        export, 2 cores, one head pass: fp32 29.4 -> 22.4 ms, int4 5.6 -> 3.8 ms). ``batch``: requests will be
        decoded together (``trunk_rows``); the head graph's float weights are then kept prepacked by ONNX Runtime,
        a second copy of them: unpacked, a matmul packs the whole weight again at every run of more than one row
        (measured on the bench export's LM head, 151936 x 896 fp32, 2 cores: 4 rows 29 ms unpacked, 16 ms
        prepacked; one row 13-14 ms either way), and rounds one row differently from several. ``quantized``: the
        export's matmuls are quantized (MatMulNBits: see ``pool_min_rows``)."""
        from runtime.backends.ort_head import DenseInputGrad, OrtHead, supported

        fused = bool(self.head_major_layers)
        # the batched head: the head graph's head-major form where the trunk is fused, else PyTorch's head over the
        # rows (``runtime.pool.head_rows``)
        self.head_rows = partial(head_rows, head, dtype=self.dtype, device=self.device)
        if supported(head, self.dtype, self.device) is None:
            self.base_head = OrtHead(head, options(self.threads), head_major=fused, packed=batch and fused)
            if fused:
                self.head_rows = self.base_head.rows
                self._lookup = table_rows(head.embed_tokens)
                self._width = int(self._lookup([0]).shape[-1])
                self.decode_rows = self._decode_rows
                # one request alone is one row: the fused trunk's and the prepacked head's numbers for a row are the
                # same in a call of one row as of several (``pool_min_rows``); one request at a time: nothing to match
                self.pool_min_rows = 2 if quantized and batch else 1
            if type(head.lm_head) is torch.nn.Linear:  # V-Reason's backward through it (a quantized one has its own)
                head.lm_head_input_grad = DenseInputGrad(head.lm_head.weight, options(self.threads))

    def static_rows(self, cuda_graphs: bool) -> None:
        """Static decode of several requests: ``trunk_rows`` and ``head_rows`` as they are (their shapes are the
        pool's, not the rows' lengths; ONNX Runtime captures no CUDA graphs here)."""

    def _bind(self, session, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        run_bound(session, inputs, outputs, self.device)

    def trunk(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
              deepstack: torch.Tensor | None = None) -> torch.Tensor:
        s = embeds.shape[1]
        if self.head_major_layers and s == 1 and deepstack is None:
            cache.room(1)
            return self._one_token(embeds, positions, cache.length, cache)
        self._hidden, hidden = hidden_view(self._hidden, s, embeds.shape[2], self.dtype, self.device)
        extra = self.deepstack.inputs(deepstack, s, self.dtype, self.device)
        if self.head_major_layers:
            cache.room(s)
            length = torch.tensor([cache.length], dtype=torch.long, device=self.device)
            inputs, outputs = head_major_bindings(self.num_layers, embeds.contiguous(), positions.contiguous(), length,
                                                  cache, hidden, extra)
        else:
            inputs, outputs = trunk_bindings(self.num_layers, embeds.contiguous(), positions.contiguous(), cache,
                                             hidden, extra)
        self._bind(self.trunk_session, inputs, outputs)
        return hidden

    def trunk_step(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                   index: torch.Tensor) -> torch.Tensor:
        """Static decode of one token over the whole fixed-capacity cache (see ``bindings``)."""
        if self.head_major_layers:  # the new entries are written at the index in place
            return self._one_token(embeds, positions, index, cache)
        self._hidden, hidden = hidden_view(self._hidden, 1, embeds.shape[2], self.dtype, self.device)
        self._staging = staging_buffers(self._staging, self.num_layers, cache)
        inputs, outputs = static_trunk_bindings(self.num_layers, embeds.contiguous(), positions.contiguous(), index,
                                                cache, hidden, self._staging,
                                                self.deepstack.inputs(None, 1, self.dtype, self.device))
        self._bind(self.trunk_session, inputs, outputs)
        scatter_staging(self.num_layers, cache, index, self._staging)
        return hidden

    def _one_token(self, embeds: torch.Tensor, positions: torch.Tensor, length: int | torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """One token through the fused form, decode and static alike: its binding (the cache's buffers, and this
        backend's own for the token's embedding, position, entry index and output) is made once per cache and
        reused (one per running request), so a step copies three small tensors in and runs (binding its ~100
        tensors by address cost 0.4 ms a step on the bench export). The output is the same buffer at every step of
        a cache."""
        # the buffers' addresses and layouts, read off the views (``cache.storage``'s transposes and checks cost
        # ~50 us a step here; they run when the binding is made)
        held = (*cache.keys[: self.num_layers], *cache.values[: self.num_layers])
        key = (tuple(t.data_ptr() for t in held), tuple(t.stride(1) for t in held), cache.capacity)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
        else:
            h = embeds.shape[2]
            step = _Step(key, torch.empty(1, 1, h, dtype=self.dtype, device=self.device),
                         torch.empty(3, 1, 1, dtype=torch.long, device=self.device),
                         torch.empty(1, dtype=torch.long, device=self.device),
                         torch.empty(1, 1, h, dtype=self.dtype, device=self.device))
            inputs, outputs = head_major_bindings(self.num_layers, step.embeds, step.positions, step.length, cache,
                                                  step.hidden, self.deepstack.inputs(None, 1, self.dtype, self.device))
            step.io = bind(self.trunk_session, inputs, outputs, self.device)
            self._steps[key] = step
            while len(self._steps) > STEP_BINDINGS:
                self._steps.popitem(last=False)
        step.embeds.copy_(embeds)
        step.positions.copy_(positions)
        if isinstance(length, torch.Tensor):
            step.length.copy_(length)
        else:
            step.length.fill_(length)
        self.trunk_session.run_with_iobinding(step.io)
        return step.hidden

    def trunk_rows(self, calls: list[tuple]) -> list[torch.Tensor]:
        """One decode step of several requests in one run of the trunk graph (the engine's batched call,
        ``runtime.engine.Call``): ``calls`` are (embeds [1,1,H], positions [3,1,1], cache), every cache a row of one
        ``KVPool``; each token's entries go into its cache at its length (the fused form writes them in place; the
        standard graph into staging buffers, copied into the rows after). Returns each request's hidden state
        [1,1,H], a view of the batch output (read before the next batched call). The run covers the pool's rows up to
        the last one a request holds (``KVPool.span``: a request alone after a burst is one row, not every row the
        buffers grew to; the first rows of the buffers are a contiguous slice in either layout): a row without a
        call (a request prefilling, or a free row) gets a zero token written at its length, where nothing is read
        and its own next write lands."""
        pool = calls[0][2].pool
        n = pool.span
        t = kept_for_rows(self._rows, pool, n, lambda: _Rows(self, pool, n, calls[0][0].shape[2], calls[0][2]))
        embeds, positions, index, _ = row_inputs(calls, self.dtype, self.device, rows=n)
        t.embeds.copy_(embeds)
        t.positions.copy_(positions)
        t.length.copy_(index)
        self.trunk_session.run_with_iobinding(t.io)
        if t.staging:
            scatter_rows(self.num_layers, pool, t.length, t.staging)
        return [t.hidden[cache.row:cache.row + 1] for _, _, cache in calls]

    def _decode_rows(self, calls: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``decode_rows`` (fused form, with the head graph): one decode step of several requests, ``calls`` (token
        id, position, cache) with every cache a row of one pool, from their tokens' embeddings (one lookup) through
        the trunk graph's run and the head graph's, which takes the trunk's hidden states as they come out. Each
        request's (hidden state [1,1,H], logits [V]): views of the bindings' outputs, read before the next batched
        call (``OrtHead.picked`` knows the logits). The inputs are written through numpy views of the kept
        bindings: between the runs, where the weights' reads have evicted the caches, a PyTorch op costs 10-20 us
        (measured on the bench int4 export, 2 cores, 4 rows: the work outside the two runs 1.0 ms through
        ``trunk_rows`` and ``head_rows``, 0.2 ms so; docs/benchmarks.md). Rows without a call are as
        ``trunk_rows`` has them: a zero token written at the row's length, where nothing is read."""
        pool = calls[0][2].pool
        n = pool.span
        t = kept_for_rows(self._rows, pool, n, lambda: _Rows(self, pool, n, self._width, calls[0][2]))
        head = self.base_head
        h = head.batch(pool, n)
        rows = []
        for _, _, cache in calls:
            if cache.pool is not pool or cache.row >= n:
                raise ValueError("a batched call takes rows of one KV pool (the rows it covers)")
            cache.room(1)
            rows.append(cache.row)
        embeds, positions, length = t.embeds_np, t.positions_np, t.length_np
        if len(rows) < n:
            embeds.fill(0)
            positions.fill(0)
        embeds[rows, 0] = self._lookup([call[0] for call in calls])
        positions[:, rows, 0] = [call[1] for call in calls]  # M-RoPE: a text token's three positions are equal
        length[:] = pool.lengths()[:n]
        self.trunk_session.run_with_iobinding(t.io)
        h.hidden_np[:] = t.hidden_np
        h.positions_np[:] = positions
        h.length_np[:] = length
        logits = head.run_rows(h, rows)
        return [(t.row_hidden[r], x) for r, x in zip(rows, logits)]

    def encode_vision(self, inputs: dict[str, torch.Tensor], tokens: int,
                      hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds [tokens, hidden], DeepStack features [K, tokens, hidden] or None) of one visual input."""
        embeds = torch.empty(tokens, hidden_size, dtype=self.dtype, device=self.device)
        deepstack = torch.empty(self.vision_levels, tokens, hidden_size, dtype=self.dtype, device=self.device) \
            if self.vision_levels else None
        ins, outs = vision_bindings({k: v.contiguous() for k, v in inputs.items()}, embeds, deepstack)
        self._bind(self.vision, ins, outs)
        return embeds, deepstack


@dataclass
class _Step:
    """A kept one-token binding of the fused trunk: for the cache whose buffers' addresses are ``key``."""

    key: tuple
    embeds: torch.Tensor
    positions: torch.Tensor
    length: torch.Tensor
    hidden: torch.Tensor
    io: object = None


class _Rows:
    """``OrtBackend.trunk_rows``' binding over one pool's buffers: its first ``n`` rows, its own input and output
    buffers (and, for the standard graph, the staging buffers of the new entries)."""

    def __init__(self, backend: OrtBackend, pool, n: int, hidden: int, cache: KVCache) -> None:
        dt, dev = backend.dtype, backend.device
        self.embeds = torch.zeros(n, 1, hidden, dtype=dt, device=dev)
        self.positions = torch.zeros(3, n, 1, dtype=torch.long, device=dev)
        self.length = torch.zeros(n, dtype=torch.long, device=dev)
        self.hidden = torch.empty(n, 1, hidden, dtype=dt, device=dev)
        extra = backend.deepstack.inputs(None, 1, dt, dev, rows=n)  # decode tokens carry no DeepStack features
        self.staging: list[torch.Tensor] = []
        if pool.head_major:  # the fused form
            inputs, outputs = head_major_rows_bindings(backend.num_layers, self.embeds, self.positions, self.length,
                                                       pool, self.hidden, extra, rows=n)
        else:
            self.staging = staging_buffers([], backend.num_layers, cache, rows=n)
            inputs, outputs = rows_bindings(backend.num_layers, self.embeds, self.positions, self.length, pool,
                                            self.hidden, self.staging, extra, rows=n)
        self.io = bind(backend.trunk_session, inputs, outputs, dev)
        self.row_hidden = [self.hidden[r:r + 1] for r in range(n)]  # each row's hidden state [1,1,H], made once
        if dev.type == "cpu":  # numpy views of the inputs and the output (``decode_rows``)
            self.embeds_np, self.positions_np, self.length_np, self.hidden_np = (
                x.numpy() for x in (self.embeds, self.positions, self.length, self.hidden))


def table_rows(embed) -> Callable[[list[int]], np.ndarray]:
    """The rows of the embedding module ``embed`` for a list of token ids, as a numpy array [ids, H]: the float
    table's rows, or an int8 table's rows times their scales (``models.quantized.QuantEmbedding``), the same
    numbers as the module gives; any other module is called."""
    from models.quantized import QuantEmbedding

    if type(embed) is torch.nn.Embedding and embed.weight.device.type == "cpu" and \
            embed.weight.dtype == torch.float32:
        table = embed.weight.detach().numpy()
        return lambda ids: table[ids]
    if type(embed) is QuantEmbedding and embed.scales.device.type == "cpu" and embed.scales.dtype == torch.float32:
        codes, scales = embed.codes.numpy(), embed.scales.numpy()
        return lambda ids: codes[ids] * scales[ids, None]  # int8 to float32, then one float32 product, as PyTorch

    def called(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return embed(torch.tensor(ids)).float().cpu().numpy()

    return called


def options(threads: int = 0, accuracy_level: int | None = None):
    """Session options of the runtime's graphs (``accuracy_level``: of quantized matmuls, default the runtime's;
    0 computes them in float, for comparisons with float tolerances)."""
    import onnxruntime as ort

    from export.sessions import ACCURACY_LEVEL

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # a pool's threads spin between the nodes of one run (no wake-up per operator) and stop when the run
    # returns: the trunk and the head graph each have a pool, and a pool still spinning after its run would
    # take the cores from the next (measured on the bench export, 2 cores: spinning left on in both sessions
    # cut int4 decode from 53 to 20 tokens/s). With this and PyTorch on one thread between the calls
    # (``OrtBackend.torch_threads``), int4 decode went from 60 to 74 tokens/s (docs/benchmarks.md)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = threads
    # an int4 QDQ trunk is fused into MatMulNBits at load; this is the accuracy level that fusion gets
    level = ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return opts


def _session(ort, path: Path, opts, providers):
    """An ONNX Runtime session; a graph it cannot load is one UserError naming the file."""
    from models.errors import UserError, one_line

    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types (Fail, InvalidGraph, ...)
        raise UserError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {one_line(e, 300)}); re-export it, "
                        "or update onnxruntime") from None
