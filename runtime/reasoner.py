"""The Python API for video analytics apps.

    reasoner = Reasoner.load("engines/q7")
    result = reasoner.ask(frames=[rgb0, rgb1, ...], question="What happens?", method="vreason")

One Reasoner serves many requests without reloading. Its requests run on one engine thread
(``runtime.engine``): any number of threads may share it; each request's pieces come back through a channel of
its own, so no consumer waits for another's; up to ``max_batch`` requests run at once within a KV budget
(``kv_mb``), their decode steps batched into one graph call where the backend can (the ort backend's fused CPU
graphs: their caches are rows of one pool, ``runtime.pool``), taking turns elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from controller.config import METHODS
from export.manifest import check_export, weight_format
from models.checkpoint import resolve_dtype
from models.checks import available_memory, check_device, check_number, device_memory
from models.errors import InputError, ResourceError, UserError
from models.inputs import Prompt, Visual, build_prompt, visual_from
from models.preprocess import VisionSettings
from models.prompt import Tokenizer, load_chat_template, prompt_ids
from models.registry import family
from runtime.backends import resolve
from runtime.cache import KVCache
from runtime.engine import TICK, Engine, apart, drain
from runtime.generate import Cancelled, DecodeState, Loop
from runtime.hugepages import after_load, anonymous
from runtime.reuse import ReuseStore, default_reuse_mb, nbytes
from runtime.sampling import SamplingParams
from runtime.stream import Result, Stream, TokenEvent

__all__ = ["Reasoner", "Result", "Stream", "TokenEvent"]

DECODE = ("auto", "static", "dynamic")
VISION_GROUP = 4  # temporal patches per vision encoder call (a cancel is seen between calls)


class Reasoner:
    def __init__(self, engine_dir: Path, manifest: dict, backend, head, tokenizer: Tokenizer, chat_template: str,
                 settings: VisionSettings, backend_reason: str, decode: str = "dynamic", cuda_graphs: bool = False,
                 compile: bool = False, reuse_mb: int | None = None, max_batch: int | None = None,
                 kv_mb: float | None = None) -> None:
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.cfg = family(manifest["model_type"]).Config.from_stored(manifest["config"])
        self.backend = backend
        self.backend_reason = backend_reason
        self.head = head
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.settings = settings
        self.limits = manifest["limits"]
        self.weights = weight_format(manifest)
        self.device = backend.device
        self.dtype = backend.dtype
        self.decode, self.cuda_graphs, self.compile = decode, cuda_graphs, compile
        self._sessions: dict = {}  # static decode: the last request's cache, buffers and captured graphs
        self.max_batch = default_max_batch(decode) if max_batch is None else max_batch
        together = backend.batch_rows and (decode == "dynamic" or self.max_batch > 1)
        cap = backend.max_rows if together else 0
        if cap and self.max_batch > cap:  # a TensorRT engine's decode profile
            if max_batch is not None:
                raise InputError(f"max_batch={max_batch} is more than this export's TensorRT decode profile takes "
                                 f"({cap} rows); pass max_batch<={cap}, or re-export with --max-batch {max_batch} "
                                 "--tensorrt")
            self.max_batch = cap
        if decode == "static" and self.max_batch > 1 and not backend.batch_static:
            raise InputError(f"max_batch={self.max_batch} needs dynamic decode on the {backend.name} backend: its "
                             "static decode keeps one cache (and its CUDA graphs) for one request at a time; load with "
                             "decode='dynamic' or max_batch=1")
        # the running requests' caches as rows of one pool, decoded together in one graph call per step, where
        # the backend can (``batch_rows``: the ort backend, the torch backend, TensorRT engines built with a batch
        # range). Static decode one request at a time (max_batch 1) keeps a cache of its own per request, its
        # whole step (V-Reason's update included) captured (``runtime.static.StaticLoop``); static decode of several
        # (the torch backend) runs the pool's batched calls at fixed shapes, a CUDA graph per pool shape
        # (``TorchBackend.static_rows``), with the pool's rows in powers of two
        self.pool = None
        if together:
            from runtime.pool import KVPool

            t = self.cfg.text
            self.pool = KVPool(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, self.dtype, self.device,
                               min_rows=backend.pool_min_rows, head_major=backend.pool_head_major,
                               row_buckets=decode == "static", max_capacity=self.limits["max_context"])
            if decode == "static":
                backend.static_rows(cuda_graphs)
        # the thread that runs this model's requests, up to max_batch at once within the KV budget: each request
        # declares its cache's bytes (``kv_need``); a pool's rows all have the longest capacity (``KVPool.held_bytes``)
        rows = self.pool.rows_for(1) if self.pool is not None else 1
        self.kv_mb = default_kv_mb(self.cfg, self.limits["max_context"], self.dtype, self.device, rows) \
            if kv_mb is None else kv_mb
        cost = None
        if self.pool is not None:  # (each request's bytes are its row's: rows x the longest, as held_bytes counts)
            pool = self.pool
            cost = lambda kvs: pool.rows_for(len(kvs)) * max(kvs)  # noqa: E731
        self.engine = Engine(f"engine {engine_dir.name}", self.device, self.max_batch, int(self.kv_mb * 2**20), cost)
        self.hugepages = None  # the move of the loaded weights into 2 MB pages (``runtime.hugepages.Move``; CPU)
        self.reuse_mb = default_reuse_mb(self.device) if reuse_mb is None else reuse_mb
        self.reuse = ReuseStore(self.reuse_mb * 2**20)
        self.frame_local_vision = bool(getattr(family(manifest["model_type"]), "FRAME_LOCAL_VISION", False))
        self.stop_ids = set(self.cfg.eos_token_ids)
        for tok in ("<|im_end|>", "<|endoftext|>"):
            if (i := tokenizer.token_id(tok)) is not None:
                self.stop_ids.add(i)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", device: str | None = None,
             model_dir: str | Path | None = None, verify: bool = True, decode: str = "auto",
             cuda_graphs: bool | None = None, compile: bool = False, threads: int | None = None,
             reuse_mb: int | None = None, ort_trunk: str = "auto", max_batch: int | None = None,
             kv_mb: float | None = None, hugepages: bool = True) -> Reasoner:
        """Open an export directory, checked as ``python -m export --check`` does: manifest, files present
        with their recorded sizes, graph I/O, and (``verify``, the default) every file's sha256, which
        takes a while for a multi-GB export; ``verify=False`` skips only the hashing.

        ``decode``: ``static`` (fixed-shape steps over the whole cache, see ``runtime.static``), ``dynamic``
        (the cache grows per token), ``auto`` (static on CUDA, dynamic on CPU, where ONNX Runtime measured
        faster with the growing cache). ``cuda_graphs`` (default: on for static decode on CUDA) replays each
        step as a CUDA graph; ``compile`` adds torch.compile of the trunk step (torch backend on CUDA; tens of
        seconds on first use per shape). ``threads``: CPU threads for ONNX Runtime and PyTorch (default: all
        cores; an evaluation replica sharing a machine takes its share). ``model_dir`` (torch backend): run that
        checkpoint's trunk, vision encoder and head instead of the export's own weights (the parity reference).

        ``reuse_mb``: memory (MiB, on the model's device) for work reused across requests, least recently used
        first out: vision features per temporal patch (two frames) and the cache of prompt prefixes, both found by
        content (see ``runtime.reuse``), so several questions on one clip, or overlapping windows of a stream,
        skip the encoding and prefill they share. 0 turns reuse off. Default: a tenth of the device's free memory
        at load (CUDA: free GPU memory; CPU: available RAM), at most 2048. An answer with reuse equals the answer
        without it up to float rounding (the suffix is prefilled on top of the restored prefix).

        ``ort_trunk`` (ort on CPU): ``fused`` runs the trunk as ONNX Runtime's fused operators (see
        ``runtime.backends.ort_trunk``), ``standard`` the exported graph, ``auto`` the fused form where the export
        keeps its weights in ``trunk.onnx.data`` (where it costs no memory).

        ``max_batch``: requests the engine runs at once (``runtime.engine``): a prefill chunk at a time each, and
        their decode steps in one graph call (one pass over the weights for all) with dynamic decode: the ort backend
        (with the fused CPU graphs, a float LM head is then also kept prepacked by ONNX Runtime, a second copy of
        it: ``OrtBackend.attach_head``), the torch backend, and TensorRT engines up to their decode profile's batch
        range (``python -m export --max-batch``, default 8; the default max_batch is capped there). Default 4 with
        dynamic decode, 1 with static decode (one request's whole step, V-Reason's update included, captured as
        a CUDA graph). On the torch backend static decode takes ``max_batch`` > 1 too: the batched calls at fixed
        shapes over the running requests' pool, a CUDA graph per pool shape (rows in powers of two), V-Reason's
        updates eager between them (``TorchBackend.static_rows``; not yet measured on a GPU); on ort, the batched
        calls as they are (already over the pool's whole buffers); on TensorRT it is refused.
        ``kv_mb``: the KV cache (MiB) the running requests may hold together (with requests decoded together, each
        row of their pool at the longest one's capacity: ``KVPool.held_bytes``); a request waits for room, and one
        that needs more than all of it is refused. Default: a quarter of the device's free memory at load, and at
        least one request at the export's context limit.

        ``hugepages`` (CPU, Linux): after loading, the memory the load added is moved into 2 MB pages on a background
        thread at the lowest CPU priority (``runtime.hugepages``; decode steps read the weights with fewer TLB misses:
        the bench fp32 export's 4-row step x1.01-x1.28 faster, median x1.09, process against process on a 2-core VM;
        at int4 within the noise). The model answers at once; ``reasoner.hugepages.wait()`` waits for the move,
        ``reasoner.hugepages.as_dict()`` says how far it is. Nothing happens elsewhere (the state says why).

        The work runs on a thread of its own that ends with it (``runtime.engine.apart``: PyTorch's CPU worker
        threads are then the engine thread's alone); errors are raised here."""
        if decode not in DECODE:
            raise UserError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE)}")
        check_number("reuse_mb", reuse_mb, lo=0, integer=True, optional=True)
        check_number("max_batch", max_batch, lo=1, hi=256, integer=True, optional=True)
        check_number("kv_mb", kv_mb, lo=0, lo_open=True, optional=True)
        if not isinstance(hugepages, bool):
            raise InputError(f"hugepages must be True or False, not {hugepages!r}")
        if threads is not None:
            torch.set_num_threads(check_number("threads", threads, lo=1, integer=True))
            import cv2

            cv2.setNumThreads(threads)  # video decoding and resizing too
        # (on a thread of its own: its PyTorch CPU threads end with it, and the engine's run alone; see apart)
        before = anonymous() if hugepages else None
        r = apart(lambda: cls._open(engine_dir, backend, device, model_dir, verify, decode, cuda_graphs, compile,
                                    threads, reuse_mb, ort_trunk, max_batch, kv_mb))
        if before is not None and r.device.type == "cpu":
            r.hugepages = after_load(before)
        return r

    @classmethod
    def _open(cls, engine_dir, backend, device, model_dir, verify, decode, cuda_graphs, compile, threads, reuse_mb,
              ort_trunk, max_batch, kv_mb) -> Reasoner:
        """``load``'s work, its arguments checked."""
        d = Path(engine_dir).expanduser()
        manifest = check_export(d, verify_hashes=verify)
        q = manifest["quantization"]
        if backend == "trt" and not q.get("tensorrt", True):
            raise UserError(f"this export's trunk is quantized {q['scheme']} as MatMulNBits, which TensorRT cannot "
                            "run; use --backend ort or torch, or re-export with --quantize int4")
        name, reason = resolve(backend, d)
        if name == "trt" and not q.get("tensorrt", True):  # auto: TensorRT is here but cannot run this trunk
            name, reason = "ort", "ONNX Runtime: the trunk is MatMulNBits, which TensorRT cannot run"
        dtype = resolve_dtype(manifest["precision"])
        device = check_device(device or ("cuda" if name == "trt" else "cpu"), "device")
        fam = family(manifest["model_type"])
        cfg = fam.Config.from_stored(manifest["config"])
        check_cache_fits(cfg, manifest["limits"]["max_context"], dtype, device)
        load_head = fam.load_head
        if name == "torch":
            from runtime.backends.torch_ref import TorchBackend, model_from_export

            if model_dir is not None:  # the parity reference: the checkpoint's own weights
                from models import load_model

                src = Path(model_dir)
                if quantized(manifest):
                    raise UserError(f"--model runs a checkpoint's unquantized weights, and this export is quantized "
                                    f"{manifest['quantization']['scheme']}; drop --model (the export runs from its "
                                    "own weights)")
                if not (src / "config.json").is_file():
                    raise UserError(f"--model {src} has no config.json; pass a checkpoint directory")
                model = load_model(src, dtype=dtype, device=device)
                head = model.head
            else:  # the export alone
                model = model_from_export(d, manifest, dtype, device)
                head = load_head(cfg, d / "head.safetensors", dtype, device, manifest["quantization"])
            impl = TorchBackend(model, dtype, device)
        else:
            if name == "trt":
                from runtime.backends.trt import TrtBackend
                impl = TrtBackend(d, dtype, device)
            else:
                from runtime.backends.ort import OrtBackend
                impl = OrtBackend(d, dtype, device, threads=threads or 0, text=cfg.text, trunk_graph=ort_trunk)
            head = load_head(cfg, d / "head.safetensors", dtype, device, manifest["quantization"])
        on_cuda = torch.device(device).type == "cuda"
        if not on_cuda and isinstance(head.lm_head, torch.nn.Linear):
            head.prefer_column_major_lm_head()
        if name == "torch" and model_dir is None:  # (the parity reference, --model, keeps PyTorch's own linears)
            impl.pack_linears(head)
            if impl.packed_linears:
                reason += f"; {impl.packed_linears} float linears through oneDNN over weights packed at load"
        static = decode == "static" or (decode == "auto" and on_cuda)
        if name == "ort":  # (max_batch checked against static decode when the Reasoner is made)
            batch = (default_max_batch("static" if static else "dynamic") if max_batch is None else max_batch) > 1
            impl.attach_head(head, batch=batch, quantized=quantized(manifest))
        else:
            impl.attach_head(head)
        # (a quantized export's trunk was fused when its weights were loaded, and its head is the export's)
        if static and on_cuda and name == "torch" and not quantized(manifest):
            fuse_projections(impl.model)
        graphs = static and on_cuda and (cuda_graphs is None or cuda_graphs)
        return cls(d, manifest, impl, head, Tokenizer(d), load_chat_template(d), VisionSettings.from_dir(d), reason,
                   decode="static" if static else "dynamic", cuda_graphs=graphs, compile=compile and static and on_cuda,
                   reuse_mb=reuse_mb, max_batch=max_batch, kv_mb=kv_mb)

    # -- requests -----------------------------------------------------------------------------------------

    def prepare(self, *, question: str, video=None, frames=None, image=None, fps: float | None = None,
                max_frames: int | None = None, template: str = "reasoning", options: list[str] | None = None,
                max_new_tokens: int = 512, color_order: str = "rgb", frames_fps: float | None = None,
                video_min_pixels: int | None = None,
                video_max_pixels: int | None = None, video_total_pixels: int | None = None,
                image_min_pixels: int | None = None, image_max_pixels: int | None = None) -> Prompt:
        """Decode and preprocess the visual input, build the prompt and check it fits; no model compute.

        ``fps``: the rate a video is sampled at (default: the checkpoint's processor setting). ``frames_fps``:
        the rate caller ``frames`` were captured at; given, they are sampled at ``fps`` like a video file.
        Without it, caller frames count as already sampled, ``1 / fps`` seconds apart (``fps`` default 2.0).
        ``max_frames``: take at most this many video frames (default and ceiling: the export's limit; more
        caller frames are thinned evenly). The pixel budget (default: the checkpoint's processor
        settings; see ``VisionSettings.with_budget``): ``video_min_pixels`` / ``video_max_pixels`` per frame,
        ``video_total_pixels`` over all frames, ``image_min_pixels`` / ``image_max_pixels``; fewer pixels
        mean fewer vision tokens and a shorter prefill."""
        max_new_tokens = check_number("max_new_tokens", max_new_tokens, lo=1, integer=True)
        check_number("fps", fps, lo=0, lo_open=True, hi=1000, optional=True)
        check_number("frames_fps", frames_fps, lo=0, lo_open=True, hi=1000, optional=True)
        limit = self.limits.get("max_frames")
        max_frames = check_number("max_frames", max_frames, lo=1, hi=limit, integer=True, optional=True) or limit
        if not isinstance(question, str):
            raise InputError(f"the question must be a string, got {type(question).__name__}")
        settings = self.settings.with_budget(fps, video_min_pixels, video_max_pixels, video_total_pixels,
                                             image_min_pixels, image_max_pixels)
        visual = visual_from(self.cfg, settings, video=video, frames=frames, image=image,
                             fps=2.0 if fps is None else fps, max_frames=max_frames, color_order=color_order,
                             frames_fps=frames_fps, max_patches=self.limits["max_vision_patches"])
        visuals = [visual] if visual else []
        for v in visuals:
            n = v.pixel_values.shape[0]
            if n > self.limits["max_vision_patches"]:
                raise InputError(f"the visual input has {n} patches, this export takes at most "
                                 f"{self.limits['max_vision_patches']}; use fewer frames or re-export with "
                                 "a larger --max-vision-patches")
        ids = prompt_ids(self.tokenizer, self.chat_template, question, [v.prompt_entry(self.cfg) for v in visuals],
                         template, options)
        total = len(ids) + max_new_tokens
        vision = sum(v.tokens for v in visuals)
        if len(ids) > self.limits["max_prompt"]:
            raise InputError(f"the prompt has {len(ids)} tokens ({vision} of them visual), over this export's prompt "
                             f"limit {self.limits['max_prompt']}; use fewer frames (max_frames) or fewer pixels per "
                             "frame (video_max_pixels), a shorter question, or re-export with a larger --max-prompt")
        if total > self.limits["max_context"]:
            raise InputError(f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{total}, over this export's context limit {self.limits['max_context']}; ask for fewer "
                             "new tokens, shorten the prompt, or re-export with a larger --max-context")
        return build_prompt(self.cfg, ids, visuals)

    def _embed(self, prompt: Prompt) -> tuple[torch.Tensor, float]:
        """(inputs_embeds [1, S, H], seconds spent) of a prompt (see ``_prefill_inputs``)."""
        embeds, _, seconds, _ = self._prefill_inputs(prompt)
        return embeds, seconds

    def _prefill_inputs(self, prompt: Prompt, start: int = 0, cancelled=None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, float, int]:
        """(inputs_embeds [1, S - start, H], DeepStack features [K, 1, S - start, H] or None, seconds spent,
        temporal patches reused: from the reuse store, or all of them where the restored prefix holds every
        visual token) of the prompt from token ``start`` on: token embeddings with the vision
        encoder's output at the visual pad tokens; for a family with DeepStack, its features scattered to the
        same positions (zero elsewhere). Visual inputs are encoded only where their tokens lie at or after
        ``start``. ``cancelled()`` is checked between vision encoder calls. All at once: ``_prefill_steps`` is
        the same, a vision encoder call at a time."""
        return drain(self._prefill_steps(prompt, start, cancelled))

    def _prefill_steps(self, prompt: Prompt, start: int = 0, cancelled=None):
        """``_prefill_inputs`` as a generator: yields ``TICK`` between vision encoder calls (where the engine may
        advance other requests), returns its tuple; no grad mode is held across a yield."""
        from models.qwen3_vl.model import scatter_deepstack

        t0 = time.perf_counter()
        ids = torch.tensor([prompt.ids[start:]], dtype=torch.long, device=self.device).view(1, -1)
        deepstack, reused, elsewhere = None, 0, 0.0
        with torch.no_grad():
            embeds = self.head.embed(ids)
            pad = (ids[0] == self.cfg.video_token_id) | (ids[0] == self.cfg.image_token_id)
        if prompt.visuals and bool(pad.any()):
            feats = []
            for v in prompt.visuals:
                waited = [0.0]
                f, d, n = yield from self._encode(v, cancelled, waited)
                elsewhere += waited[0]
                feats.append((f, d))
                reused += n
            skip = int(prompt.video_token_index.lt(start).sum())  # visual tokens inside the reused prefix
            with torch.no_grad():
                embeds[0, pad] = torch.cat([f for f, _ in feats])[skip:].to(embeds.dtype)
                if feats[0][1] is not None:
                    deepstack = scatter_deepstack([torch.cat([d for _, d in feats], dim=1)[:, skip:]], pad,
                                                  embeds.dtype)
        elif prompt.visuals:  # every visual token lies in the restored prefix: every patch reused, none encoded
            reused = sum(int(v.span.grid_thw[0]) for v in prompt.visuals)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return embeds, deepstack, time.perf_counter() - t0 - elsewhere, reused

    def _encode(self, v: Visual, cancelled=None, waited: list | None = None):
        """A generator returning (features [tokens, H], DeepStack [K, tokens, H] or None, temporal patches reused)
        of one visual input. Families whose encoder sees one temporal patch at a time are encoded in groups of
        ``VISION_GROUP`` patches (``TICK`` yielded and ``cancelled()`` checked between groups; ``waited[0]`` adds
        up the time spent away), each patch's features kept in the reuse store and taken from it when the same
        pixels come again."""
        if not self.frame_local_vision:
            with torch.no_grad():
                f, d = self._encode_grid(v.pixel_values, v.indices, v.tokens)
            return f, d, 0
        t, h, w = (int(x) for x in v.span.grid_thw)
        per, tokens = h * w, h * w // self.cfg.vision.spatial_merge_size**2
        keys = [("vision", self.dtype, h, w, k) for k in v.patch_digests()] if self.reuse.enabled else [None] * t
        got = [self.reuse.get(k) if k is not None else None for k in keys]
        missing = [i for i, g in enumerate(got) if g is None]
        fam = family(self.cfg.model_type)
        for a in range(0, len(missing), VISION_GROUP):
            if a:
                away = time.perf_counter()
                yield TICK
                if waited is not None:
                    waited[0] += time.perf_counter() - away
            if cancelled is not None and cancelled():
                raise Cancelled
            group = missing[a:a + VISION_GROUP]
            rows = torch.cat([v.pixel_values[i * per:(i + 1) * per] for i in group])
            with torch.no_grad():
                f, d = self._encode_grid(rows, fam.vision_inputs((len(group), h, w), self.cfg.vision),
                                         tokens * len(group))
            for j, i in enumerate(group):
                got[i] = (f[j * tokens:(j + 1) * tokens], None if d is None else d[:, j * tokens:(j + 1) * tokens])
                if keys[i] is not None:  # a compact copy: a view would keep the whole group's output alive
                    kept = tuple(None if x is None else x.clone() for x in got[i])
                    self.reuse.put(keys[i], kept, nbytes(*kept))
        feats = torch.cat([g[0] for g in got])
        deep = None if got[0][1] is None else torch.cat([g[1] for g in got], dim=1)
        return feats, deep, t - len(missing)

    def _encode_grid(self, pixel_values: torch.Tensor, indices: dict, tokens: int):
        inputs = {"pixel_values": pixel_values.to(self.device, self.dtype),
                  **{k: t.to(self.device) for k, t in indices.items()}}
        return self.backend.encode_vision(inputs, tokens, self.cfg.text.hidden_size)

    def stream(self, *, question: str, method: str = "base", max_new_tokens: int = 512, template: str = "reasoning",
               sampling: SamplingParams | None = None, stop: list[str] | None = None, controller=None,
               chunk: int = 1, events: bool = False, **visual) -> Stream:
        """Like ``ask`` but iterable: yields text pieces as tokens come (``events``: a ``TokenEvent`` per token
        instead, with its id, text piece, possibly '', and entropy); ``.result`` once exhausted. ``chunk``: with
        static decode, how many tokens are decoded between host reads of the ids (1: each as it comes). The
        request's clock (``timings["ttft_s"]``) starts here, before the visual input is prepared."""
        start = time.perf_counter()
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        sampling = sampling or SamplingParams()
        sampling.validate()
        controller = self.controller_config(controller) if method != "base" else controller
        prompt = self.prepare(question=question, template=template, max_new_tokens=max_new_tokens, **visual)
        if self.reuse.enabled:
            for v in prompt.visuals:
                v.patch_digests()  # the reuse keys, hashed here on the caller's thread, not the engine's
        return Stream(self, prompt, method, max_new_tokens, sampling, stop or [], controller, chunk, events=events,
                      start=start, prepare_s=time.perf_counter() - start,
                      kv=self.kv_need(len(prompt.ids) + max_new_tokens))

    def ask(self, **kwargs) -> Result:
        """Answer one question about a video (file or frames) or an image; see ``stream`` for the arguments."""
        s = self.stream(**{"chunk": 8, **kwargs})
        for _ in s:
            pass
        return s.result

    def close(self) -> None:
        """Stop this Reasoner's engine and wait for its thread to end: requests running or queued end with
        ``runtime.Closed`` in their consumers (after the unit of work under way: a token, a prefill chunk or a vision
        encoder call), and later ones are refused with it. The interpreter's exit does this for every Reasoner, so a
        program that exits or is interrupted while a request runs ends with its own exit code.
        ``with Reasoner.load(...) as reasoner:`` closes it at the block's end."""
        if self.hugepages is not None:
            self.hugepages.stop()
        self.engine.close()

    def __enter__(self) -> Reasoner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def watch(self, source, questions: str | list[str] | None = None, window: float = 4.0, every: float = 2.0,
              fps: float = 2.0, **kwargs):
        """Standing questions on the latest ``window`` seconds of a live source, every ``every`` seconds: an
        iterator of one dict per answer and per source health event, the lines ``python -m runtime.watch`` writes
        (see ``runtime.live.watch`` for the options: method, trigger, max_windows, realtime, reconnect,
        max_new_tokens (default 64), template (default plain): the command's defaults).

        Several sources: ``source`` a list of sources (each asked ``questions``) or of ``(source, questions)``
        pairs (``questions`` then omitted); each is captured on its own thread and their requests share this
        Reasoner's engine (``runtime.live.watch_many``)."""
        from runtime.live import watch_many

        def listed(qs):
            return [qs] if isinstance(qs, str) else list(qs or [])

        if isinstance(source, (list, tuple)):
            pairs = [(str(s[0]), listed(s[1])) if isinstance(s, (list, tuple)) else (str(s), listed(questions))
                     for s in source]
        else:
            pairs = [(str(source), listed(questions))]
        return watch_many(self, pairs, window, every, fps, **kwargs)

    def loop(self, steering=None, chunk: int = 8) -> Loop:
        """The decode loop this Reasoner runs (static or dynamic, see ``load``)."""
        if self.decode == "static" and self.pool is None:
            from runtime.static import StaticLoop

            return StaticLoop(self.backend, self.head, steering, cuda_graphs=self.cuda_graphs, chunk=chunk,
                              compile=self.compile, sessions=self._sessions)
        return Loop(self.backend, self.head, steering, batched=self.pool is not None)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache the running requests hold (as declared to the engine)."""
        return self.engine.kv_in_use

    def kv_need(self, capacity: int) -> int:
        """Bytes of the KV cache a request of ``capacity`` entries holds (rounded up as ``cache_for`` and the pool
        round it; in a pool, one row of it: ``KVPool.held_bytes`` counts the rows requests hold together)."""
        if self.decode == "static":
            from runtime.static import static_capacity

            capacity = static_capacity(capacity, self.limits["max_context"])
        if self.pool is not None:
            capacity = self.pool.rounded(capacity)
        return cache_bytes(self.cfg, capacity, self.dtype)

    def cache_for(self, capacity: int) -> KVCache:
        """A KV cache for ``capacity`` entries. Static decode rounds the capacity up to a multiple of 256 and
        keeps the last cache (with the buffers and CUDA graphs captured on it) for the next request of the same
        size; a request of another size releases it first."""
        t = self.cfg.text
        if self.decode == "static":
            from runtime.static import static_capacity

            # within the export's context: the TensorRT decode profile's largest past
            capacity = static_capacity(capacity, self.limits["max_context"])
        if self.decode == "static" and self.pool is None:
            held = self._sessions.get("cache")
            if held is not None and held.capacity == capacity:
                held.length = 0
                return held
            self._sessions.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        need = cache_bytes(self.cfg, capacity, self.dtype)
        free = available_memory(self.device)
        if free is not None and need > free:
            raise ResourceError(f"this request needs a KV cache of {need / 2**30:.2f} GiB ({capacity} entries) and "
                                f"{self.device.type} has {free / 2**30:.2f} GiB available; ask for fewer new tokens or "
                                "use fewer frames")
        if self.pool is not None:
            return self.pool.acquire(capacity)
        cache = KVCache.allocate(t.num_hidden_layers, capacity, t.num_key_value_heads, t.head_dim, self.dtype,
                                 self.device, head_major=self.backend.head_major_layers)
        if self.decode == "static":
            self._sessions["cache"] = cache
        return cache

    @staticmethod
    def controller_config(controller):
        """A ``VReasonConfig`` from one, a dict of its fields, or None (the defaults)."""
        from controller import VReasonConfig

        if isinstance(controller, VReasonConfig):
            return controller
        if controller is not None and not isinstance(controller, dict):
            raise InputError(f"controller must be a VReasonConfig or a dict of its fields, got "
                             f"{type(controller).__name__}")
        return VReasonConfig.from_fields(controller or {})

    def steering_for(self, method: str, controller, state: DecodeState):
        if method == "base":
            return None
        from controller import VReason

        return VReason(self.controller_config(controller), state, lite=(method == "vreason-lite"))


def add_load_arguments(ap) -> None:
    """The ``Reasoner.load`` options a long-running command (``runtime.watch``, ``runtime.serve``) takes;
    ``load_options`` reads them back."""
    ap.add_argument("--backend", choices=("auto", "trt", "ort", "torch"), default="auto")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda for trt, cpu otherwise)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="requests running at once, their decode steps batched (dynamic decode on every backend, "
                         "TensorRT up to its export's --max-batch; static decode on torch and ort), else taking turns "
                         "(default 4 with dynamic decode, 1 with static)")
    ap.add_argument("--kv-mb", type=float, default=None,
                    help="KV cache (MiB) the running requests may hold together; more wait (default: a quarter of "
                         "free memory, at least one request at the export's context limit)")
    ap.add_argument("--reuse-mb", type=int, default=None,
                    help="memory for reused vision features and prompt prefixes (default: see Reasoner.load)")
    ap.add_argument("--no-verify", action="store_true", help="skip hashing the export's files")
    ap.add_argument("--no-hugepages", action="store_true",
                    help="leave the loaded weights in 4 KB pages (CPU; by default they are moved into 2 MB pages in "
                         "the background after loading, see runtime.hugepages)")


def load_options(args) -> dict:
    """``Reasoner.load`` keywords from ``add_load_arguments``' options."""
    return {"backend": args.backend, "device": args.device, "max_batch": args.max_batch, "kv_mb": args.kv_mb,
            "reuse_mb": args.reuse_mb, "verify": not args.no_verify, "hugepages": not args.no_hugepages}


DEFAULT_MAX_BATCH = 4  # requests running at once with dynamic decode (static decode: 1)
KV_FRACTION = 0.25  # of the device's free memory at load: the default KV budget


def default_max_batch(decode: str) -> int:
    return 1 if decode == "static" else DEFAULT_MAX_BATCH


def default_kv_mb(cfg, max_context: int, dtype: torch.dtype, device, rows: int = 1) -> int:
    """A quarter of the device's free memory at load (CUDA: free GPU memory; CPU: available RAM), and at least
    what one request at the export's context limit holds (``rows`` rows of it, where a request alone holds
    more than one: ``KVPool.min_rows``)."""
    one = rows * cache_bytes(cfg, max_context, dtype)
    free = available_memory(device) or 0
    return max(1, -(-max(one, int(free * KV_FRACTION)) // 2**20))


def cache_bytes(cfg, entries: int, dtype: torch.dtype) -> int:
    t = cfg.text
    item = torch.empty(0, dtype=dtype).element_size()
    return 2 * t.num_hidden_layers * entries * t.num_key_value_heads * t.head_dim * item


def check_cache_fits(cfg, max_context: int, dtype: torch.dtype, device) -> None:
    """Refuse an export whose context limit needs a KV cache larger than the device's whole memory (one line,
    before anything is allocated)."""
    need, have = cache_bytes(cfg, max_context, dtype), device_memory(device)
    if have is not None and need > have:
        t = cfg.text
        raise ResourceError(f"this export's context limit ({max_context} tokens) needs a KV cache of "
                            f"{need / 2**30:.1f} GiB ({t.num_hidden_layers} layers x {t.num_key_value_heads} kv heads "
                            f"x {t.head_dim} dims, {str(dtype).removeprefix('torch.')}), more than the "
                            f"{have / 2**30:.1f} GiB of {torch.device(device).type} memory here; re-export with a "
                            "smaller --max-context")


def quantized(manifest: dict) -> bool:
    return manifest["quantization"].get("scheme", "none") != "none"


def fuse_projections(model) -> None:
    """Concatenate q/k/v and gate/up weights of every decoder layer (fewer, larger GEMVs per token)."""
    for layer in model.decoder.layers:
        layer.fuse_projections()
