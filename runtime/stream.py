"""One request as it runs: ``Stream`` (iterating submits it to the Reasoner's engine and yields text pieces or
``TokenEvent``s), and its ``Result``. The Reasoner (``runtime.reasoner``) prepares requests and owns the model,
the cache it keeps between requests and the reuse store; this module only calls them."""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from models.errors import ResourceError
from models.inputs import Prompt
from runtime.answer import extract_answer
from runtime.detok import Detokenizer
from runtime.engine import TICK, Call, alone
from runtime.generate import Cancelled, DecodeState, Timings
from runtime.reuse import restore_prefix
from runtime.sampling import SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per trunk call in prefill (a cancel is seen between calls)


@dataclass
class Result:
    text: str
    answer: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    entropy: list[float]
    ema: list[float]
    alpha: list[float]
    timings: dict
    peak_memory_bytes: int
    backend: str
    method: str
    config: dict = field(default_factory=dict)
    skipped_updates: int = 0
    visual: dict = field(default_factory=dict)  # what the model was given: kind, frames, frame_size, tokens

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenEvent:
    """One generated token as ``stream(events=True)`` yields it."""

    id: int
    text: str  # what this token adds to the answer's text ('' while a character is incomplete, or past a stop)
    entropy: float


class Stream:
    """Iterating runs the request on the Reasoner's engine and yields decoded text pieces (or ``TokenEvent``s)."""

    def __init__(self, reasoner, prompt: Prompt, method: str, max_new_tokens: int,
                 sampling: SamplingParams, stop: list[str], controller, chunk: int = 1, events: bool = False,
                 start: float | None = None, prepare_s: float = 0.0, kv: int = 0) -> None:
        self.r, self.prompt, self.method, self.chunk = reasoner, prompt, method, chunk
        self.max_new_tokens, self.sampling, self.stop, self.controller = max_new_tokens, sampling, stop, controller
        self.events = events
        self.start = time.perf_counter() if start is None else start
        self.prepare_s = prepare_s
        self.result: Result | None = None
        self.queue_s = 0.0  # time the request waited for the engine's thread
        self.kv = kv  # bytes of KV cache it will hold (the engine's budget counts them)
        self._running = None  # what the engine tells it of its turns (``runtime.engine.Running``)
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the request: during vision encoding (between groups of frames), prefill (between chunks of
        ``PREFILL_CHUNK`` tokens) or decoding (after the token the engine is computing: it runs ahead of its
        consumer, so pieces made before the cancel arrived are still yielded). The result holds what was
        generated so far, a prefix of the whole answer (nothing, when stopped before the first token); safe to
        call from another thread; a queued request never starts."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str | TokenEvent]:
        """Submit the request to the Reasoner's engine and yield its pieces as they come; closing or dropping the
        iterator before the end cancels the request (``runtime.engine``)."""
        engine = self.r.engine
        if engine.on_engine_thread:  # made from inside the engine's own work: run here, it cannot wait for itself
            yield from (piece for piece in alone(self._run(0.0)) if piece is not TICK)
            return
        finished = False
        try:
            yield from engine.submit(self._run, kv=self.kv, threads=self.r.backend.torch_threads,
                                     prefill=len(self.prompt.ids), stopped=self._cancel.is_set)
            finished = True
        finally:
            if not finished:
                self.cancel()

    async def __aiter__(self):
        """From a coroutine: submit the request and yield its pieces as they come, handed by the engine's thread
        straight to the event loop (``runtime.engine.AsyncChannel``); closing the iterator before the end cancels
        the request."""
        from runtime.engine import AsyncChannel

        finished = False
        try:
            async for piece in self.r.engine.submit(self._run, AsyncChannel(), kv=self.kv,
                                                    threads=self.r.backend.torch_threads,
                                                    prefill=len(self.prompt.ids), stopped=self._cancel.is_set):
                yield piece
            finished = True
        finally:
            if not finished:
                self.cancel()

    def _run(self, queue_s: float = 0.0, running=None) -> Iterator[str | TokenEvent | None]:
        r = self.r
        self.queue_s, self._running = queue_s, running
        failed = False
        try:
            yield from self._generate()
        except torch.OutOfMemoryError:
            failed = True  # raised below, once this frame no longer holds the request's tensors
        if failed:
            r._sessions.clear()
            r.reuse.clear()
            if r.pool is not None:
                r.pool.clear()
            if r.device.type == "cuda":
                torch.cuda.empty_cache()
            p = self.prompt
            raise ResourceError(
                f"out of {r.device.type} memory for this request (prompt {len(p.ids)} tokens, "
                f"max_new_tokens {self.max_new_tokens}, {r.manifest['precision']} weights); use fewer frames, "
                "fewer new tokens, an export in lower precision, or a smaller reuse_mb; nothing of the request "
                "is kept")

    def _reusable(self) -> tuple:
        """(saved prefix or None, tokens to restore, the prompt's visual key, where its first visual token is)."""
        r, p = self.r, self.prompt
        vkey = tuple(v.key() for v in p.visuals) if r.reuse.enabled else ()
        first = int(p.video_token_index[0]) if p.video_token_index.numel() else len(p.ids)
        if not r.reuse.enabled or not r.backend.suffix_prefill:
            return None, 0, vkey, first
        entry, n = r.reuse.best_prefix(p.ids, vkey, first)
        return entry, n, vkey, first

    def _generate(self) -> Iterator[str | TokenEvent]:
        r = self.r
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(r.device)
        stopped = self._cancel.is_set
        ids: list[int] = []
        ents: list[torch.Tensor] = []
        alphas: list[float] = []
        text, emitted = "", 0
        detok = Detokenizer(r.tokenizer, self.stop)
        loop = cache = steps = None
        try:
            if stopped():
                raise Cancelled
            entry, reused, vkey, first = self._reusable()
            running = self._running
            if running is not None:  # its prefill's place among the others' (``engine.prefill_turn``)
                running.prefill_left = len(self.prompt.ids) - reused
            embeds, deepstack, vision_s, patches = yield from r._prefill_steps(self.prompt, reused, stopped)
            cache = r.cache_for(len(self.prompt.ids) + self.max_new_tokens)
            if entry is not None:
                restore_prefix(cache, entry, reused)
            state = DecodeState(r.head, cache, self.prompt.video_token_index.to(r.device), deepstack=deepstack)
            steering = r.steering_for(self.method, self.controller, state)
            loop = r.loop(steering, chunk=self.chunk)
            loop.timings.prepare_s, loop.timings.vision_s = self.prepare_s, vision_s
            loop.timings.queue_s = self.queue_s
            loop.timings.reused_prompt_tokens, loop.timings.reused_vision_patches = reused, patches
            loop.cancelled = stopped
            loop.in_phase = running.in_phase if running is not None else None
            if running is not None:
                loop.prefill_left = lambda n: setattr(running, "prefill_left", n)
            if r.backend.suffix_prefill:
                loop.prefill_chunk = PREFILL_CHUNK
            if r.reuse.enabled and reused < len(self.prompt.ids):
                ids_all = self.prompt.ids
                loop.after_fill = lambda c, h: r.reuse.save_prefix(ids_all, vkey, c, h)
            whole = reused == len(self.prompt.ids)
            if whole:  # the same prompt again: its cache and last hidden state restored, nothing to prefill
                loop.restored_hidden = entry.hidden
            positions = self.prompt.positions[:, reused - 1 if whole else reused:].unsqueeze(1).to(r.device)
            steps = loop.run(state, embeds, positions, self.prompt.next_position, self.max_new_tokens, self.sampling,
                             r.stop_ids)
            sent = None
            while True:
                try:
                    tok = steps.send(sent)
                except StopIteration:
                    break
                sent = None
                if isinstance(tok, Call):  # a decode step run with the other requests' (its result comes back)
                    sent = yield tok
                    continue
                if tok is TICK:  # between prefill chunks: the engine may advance another request
                    yield TICK
                    continue
                if not ids:
                    loop.timings.ttft_s = time.perf_counter() - self.start
                ids.append(tok.id)
                ents.append(tok.entropy)
                alphas.append(tok.alpha)
                piece = detok.step(tok.id)
                emitted += len(piece)
                if self.events:
                    yield TokenEvent(tok.id, piece, float(tok.entropy))
                else:
                    yield piece or TICK  # nothing to show yet (an incomplete character): still a turn
                if detok.stopped or stopped():
                    break
            text = detok.text(ids) if ids else ""
            if emitted < len(text):  # what the stream held back: a trailing incomplete character
                yield TokenEvent(ids[-1], text[emitted:], float(ents[-1])) if self.events else text[emitted:]
        except Cancelled:
            pass  # stopped before the first token: an empty result
        finally:
            if steps is not None:
                steps.close()  # its end (the decode clock) before the result is read
            self.result = self._result(loop, ids, ents, alphas, text)
            if cache is not None:
                cache.release()
            loop = cache = steps = None

    def _result(self, loop, ids, ents, alphas, text) -> Result:
        r = self.r
        steering = loop.steering if loop is not None else None
        timings = loop.timings if loop is not None else Timings(prepare_s=self.prepare_s, queue_s=self.queue_s)
        if self._running is not None:
            timings.batch_mean = self._running.batch_mean
        entropy = floats(ents)
        if alphas and torch.is_tensor(alphas[0]):  # static decode: read once, at the end
            alphas = torch.stack(alphas).cpu().tolist()
        tracker = getattr(steering, "tracker", None)
        if tracker is None or len(tracker.ema) != len(entropy):
            from controller.tracker import EntropyTracker
            tracker = EntropyTracker(steering.cfg.beta if steering is not None else 0.9)
            for h, a in zip(entropy, alphas):
                tracker.record(h, a)
        return Result(
            text=text, answer=extract_answer(text), prompt_token_ids=list(self.prompt.ids), token_ids=ids,
            entropy=entropy, ema=list(tracker.ema), alpha=list(alphas), timings=timings.as_dict(),
            peak_memory_bytes=peak_memory(r.device), backend=r.backend.name, method=self.method,
            config={**(steering.config_dict() if steering is not None else {}), "weights": r.weights},
            skipped_updates=getattr(steering, "skipped", 0),
            visual=self.prompt.visuals[0].describe(r.cfg) if self.prompt.visuals else {},
        )


def floats(values: list) -> list[float]:
    """Per-token values as floats: 0-dim tensors (read together: one device sync) and floats, in order."""
    tensors = [i for i, v in enumerate(values) if torch.is_tensor(v)]
    out = list(values)
    if tensors:
        for i, v in zip(tensors, torch.stack([values[i].float() for i in tensors]).cpu().tolist()):
            out[i] = v
    return [float(v) for v in out]


def peak_memory(device: torch.device) -> int:
    """CUDA: peak bytes allocated by PyTorch during the request. CPU: the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
