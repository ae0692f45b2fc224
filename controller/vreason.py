"""The V-Reason controller, driven between engine calls (the per-step procedure described in docs/vreason.md).

State per request: Delta V [n_video, kv_heads, head_dim] in fp32 on the head's device (zero at start),
its optimizer, the entropy tracker. The head's value-cache rows at video positions hold
V' = (V + dV) / ||V + dV|| * ||V|| (norms over head_dim, per position and head), recomputed from the
original rows V after every optimizer step and written into the cache in place; keys, text rows,
generated rows and the trunk's layers are never touched. Gradients flow only through the head for the
current token: the trunk's output is a detached input, and the graph is freed after each backward.
"""

from __future__ import annotations

import math

import torch

from controller.config import VReasonConfig
from controller.lite import lite_keep
from controller.tracker import DeviceTracker, EntropyTracker


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def switching_loss(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * KL(p || U) = alpha * (log|V| - H(p)): alpha = +1 raises entropy, -1 lowers it."""
    return alpha * (math.log(logits.shape[-1]) - entropy(logits))


def inject(values: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Norm-preserving injection over head_dim: (V + dV) / ||V + dV|| * ||V||, computed in fp32."""
    v = _upcast(values)
    moved = v + delta
    scale = v.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return moved * scale


class VReason:
    """A ``runtime.generate.Steering``: knows torch tensors and a head callable, not the backend."""

    def __init__(self, cfg: VReasonConfig, state, lite: bool = False) -> None:
        self.cfg = cfg
        self.lite = lite
        self.tracker = EntropyTracker(cfg.beta)
        self.skipped_updates = 0
        self.rows: torch.Tensor | None = None  # cache indices of the (kept) video tokens
        self.original: torch.Tensor | None = None  # [n, kv, hd] their unmodulated values
        self.delta: torch.Tensor | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.pruned: torch.Tensor | None = None
        self.on_device: DeviceTracker | None = None  # set by ``start_on_device`` (static decode)
        self._skipped_on_device: torch.Tensor | None = None

    @property
    def skipped(self) -> int:
        """Updates skipped for non-finite loss, gradient or step (both decode paths)."""
        extra = int(self._skipped_on_device) if self._skipped_on_device is not None else 0
        return self.skipped_updates + extra

    def config_dict(self) -> dict:
        return dict(self.cfg.to_dict(), lite=self.lite)

    # -- hooks -----------------------------------------------------------------------------------------------

    def after_prefill(self, state) -> None:
        cache = state.cache
        rows = state.video_index
        if self.lite and rows.numel():
            keep, self.pruned, rows = lite_keep(cache.values, cache.length, rows, self.cfg.lite_ratio)
            cache.keep(keep)
        self.rows = rows
        layer = state.head_layer
        self.original = cache.values[layer][0].index_select(0, rows).clone()  # [n, kv, hd]
        self.delta = torch.zeros(self.original.shape, dtype=torch.float32, device=self.original.device,
                                 requires_grad=True)
        self._make_optimizer(capturable=False)

    def _make_optimizer(self, capturable: bool) -> None:
        if self.cfg.optimizer == "adam":
            self.opt = torch.optim.Adam([self.delta], lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                        eps=self.cfg.adam_eps, capturable=capturable)
        else:
            self.opt = torch.optim.SGD([self.delta], lr=self.cfg.lr)

    def head_values(self, state, values: torch.Tensor) -> torch.Tensor:
        """With autograd on (an update's forward), the cached values with the video rows as a differentiable
        function of dV; otherwise the cache as it is (it already holds the injected rows)."""
        if self.delta is None or not torch.is_grad_enabled():
            return values
        rows = inject(self.original, self.delta)
        return values.index_copy(1, self.rows, rows.unsqueeze(0).to(values.dtype))

    def needs_graph(self, step: int) -> bool:
        return self.delta is not None and self.scheduled(step)

    def scheduled(self, step: int) -> bool:
        return step % self.cfg.every == 0 and self.cfg.steps > 0 and self.rows is not None and self.rows.numel() > 0

    @property
    def period(self) -> int:
        """Updates fall on the steps that are multiples of this (0: none will)."""
        return self.cfg.every if self.scheduled(0) else 0

    def step(self, state, logits: torch.Tensor, recompute) -> tuple[torch.Tensor, float]:
        alpha = self.update(state, logits, recompute)
        if alpha is not None:
            with torch.no_grad():
                logits = recompute(state)
        self.record(logits, alpha or 0.0)
        return logits, alpha or 0.0

    def update(self, state, logits: torch.Tensor, recompute) -> float | None:
        """The scheduled update for this token (its alpha), or None where none is due. The caller recomputes the
        token's logits over the updated cache and ``record``s them (``step`` does both)."""
        if not self.scheduled(state.step):
            return None
        _, _, alpha = self.tracker.preview(float(entropy(logits.detach())))
        # the first step starts from this token's own logits: with their graph when they were computed with
        # autograd on, else handed to the differentiable recompute as its LM head's output. Lite's first logits
        # come from the prefill before its pruning: computed again over the pruned cache first
        current = logits
        if self.lite and state.step == 0:
            with torch.no_grad():
                current = recompute(state)
        for i in range(self.cfg.steps):
            self._update(state, alpha, recompute, current if i == 0 else None)
        return alpha

    def record(self, logits: torch.Tensor, alpha: float) -> None:
        """The entropy of the logits sampled from, and the step's alpha (0.0: no update)."""
        self.tracker.record(float(entropy(logits)), alpha)

    @staticmethod
    def update_rows(calls: list[tuple]) -> list[float]:
        """``update`` for several requests whose update is due at this step, their first optimizer step sharing
        one pass over the LM head (the engine's batched call, ``runtime.engine.Call``). ``calls`` are (controller,
        state, logits, recompute). Each request's loss is its own token's switching loss and moves only its own
        dV (the rows are independent): per row, d(loss)/d(logits) from the given logits; then d(loss)/dx = grad @
        W for all rows in one matmul (x: the LM head's input; ``Head.lm_head_input_grad`` or the LM head's own);
        then the last layer's forward with autograd (each row's dV injected) up to x and its backward from there,
        once for all rows (``_features_rows``); then each row's guarded optimizer step and cache write, as
        ``_update`` does them. Further steps (``steps`` > 1) run per row. Returns each row's alpha."""
        from functools import partial

        from models.qwen2_5_vl.layers import input_grad

        rows = []
        for v, state, logits, recompute in calls:
            _, _, alpha = v.tracker.preview(float(entropy(logits.detach())))
            current = logits
            if v.lite and state.step == 0:  # Lite's first logits: the unpruned prefill's; again over the pruned cache
                with torch.no_grad():
                    current = recompute(state)
            rows.append((v, state, alpha, current.detach(), recompute))
        grads, losses = [], []
        for _, _, alpha, logits, _ in rows:
            with torch.enable_grad():
                given = logits.clone().requires_grad_(True)
                loss = switching_loss(given, alpha)
                grads.append(torch.autograd.grad(loss, given)[0])
            losses.append(loss.detach())
        head = rows[0][1].head
        project = head.lm_head_input_grad or partial(input_grad, head.lm_head)
        dx = project(torch.stack(grads).view(len(rows), 1, -1))  # [rows, 1, H]
        saved = []
        for v, *_ in rows:
            saved.append(v.delta.detach().clone())
            v.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():  # one forward and backward of the last layer for all rows
            x = VReason._features_rows([(v, state) for v, state, *_ in rows])
            x.backward(dx.view_as(x).to(x.dtype))
        for (v, state, alpha, _, recompute), last_good, loss in zip(rows, saved, losses):
            v._step_guarded(state, loss, last_good)
            for _ in range(1, v.cfg.steps):
                v._update(state, alpha, recompute)
        return [alpha for _, _, alpha, _, _ in rows]

    @staticmethod
    def _features_rows(rows: list[tuple]) -> torch.Tensor:
        """The current tokens' LM head inputs [n,1,H] of several requests ((controller, state) each, their caches
        rows of one pool), with autograd on, in one pass of the last layer (``Head.step_features`` over a copy of
        their rows of the head's layer, each row's dV injected into its own video rows)."""
        caches = [state.cache for _, state in rows]
        pool = caches[0].pool
        if pool is None or any(c.pool is not pool for c in caches):
            raise ValueError("a batched update takes requests whose caches are rows of one KV pool")
        state = rows[0][1]
        layer, dev = state.head_layer, state.hidden.device
        end = max(c.length for c in caches)
        which = torch.tensor([c.row for c in caches], device=dev)
        keys, values = pool.token_major(layer)
        keys, values = keys[which, :end], values[which, :end]  # [n, end, kv, hd] (copies: the step writes in them)
        index = torch.tensor([c.length - 1 for c in caches], device=dev)  # the current tokens' entries

        def injected(vc: torch.Tensor) -> torch.Tensor:
            return torch.stack([vc[i].index_copy(0, v.rows, inject(v.original, v.delta).to(vc.dtype))
                                for i, (v, _) in enumerate(rows)])

        hidden = torch.cat([s.hidden for _, s in rows])
        positions = torch.cat([s.positions for _, s in rows], dim=1)
        return state.head.step_features(hidden, positions, keys, values, index, injected)

    # -- one optimizer step ----------------------------------------------------------------------------------

    def _update(self, state, alpha: float, recompute, logits: torch.Tensor | None = None) -> None:
        """One optimizer step on the switching loss of the current token. ``logits``: its logits over the cache
        as it is (used as they are where they carry autograd's graph; else handed to ``recompute``)."""
        last_good = self.delta.detach().clone()
        with torch.enable_grad():
            if logits is None or not logits.requires_grad:
                logits = recompute(state, logits)
            loss = switching_loss(logits, alpha)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self._step_guarded(state, loss, last_good)

    def _step_guarded(self, state, loss: torch.Tensor, last_good: torch.Tensor) -> None:
        """The optimizer step on dV's gradient, kept only where the loss, the gradient and the result are finite
        (else the last good dV stays: the step is counted as skipped); then the cache write."""
        grad = self.delta.grad
        if not torch.isfinite(loss) or grad is None or not bool(torch.isfinite(grad).all()):
            self.skipped_updates += 1
            return  # keep the last good dV; this optimizer step is not taken
        self.opt.step()
        if not bool(torch.isfinite(self.delta).all()):
            with torch.no_grad():
                self.delta.copy_(last_good)
            self.skipped_updates += 1
        self.write_cache(state)

    # -- the same procedure with no host sync (static decode; replayable as a CUDA graph) ----------------------

    def start_on_device(self) -> None:
        """Switch to deciding alpha and guarding steps on the device (after ``after_prefill``). On CUDA the
        optimizer becomes capturable (its step count lives on the GPU)."""
        dev = self.delta.device
        self.on_device = DeviceTracker(self.cfg.beta, dev)
        self._skipped_on_device = torch.zeros((), dtype=torch.long, device=dev)
        self._make_optimizer(capturable=dev.type == "cuda")
        if isinstance(self.opt, torch.optim.Adam):
            # Adam's state made up front, as its first step would make it, so that the guarded step can save and
            # restore it from the very first update and a captured graph sees fixed tensors
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            step = torch.zeros((), dtype=scalar, device=dev if dev.type == "cuda" else "cpu")
            self.opt.state[self.delta] = {"step": step, "exp_avg": torch.zeros_like(self.delta),
                                          "exp_avg_sq": torch.zeros_like(self.delta)}

    def reuse_for(self, other: VReason) -> None:
        """Take over ``other``'s request (same settings and shapes, after its ``after_prefill``) into this
        controller's tensors, in place, so that graphs captured on them replay for the new request."""
        with torch.no_grad():
            self.rows.copy_(other.rows)
            self.original.copy_(other.original)
            self.delta.zero_()
            self.delta.grad = None if self.delta.grad is None else self.delta.grad.zero_()
            for t in self.opt.state.get(self.delta, {}).values():
                if torch.is_tensor(t):
                    t.zero_()
            self.on_device.reset()
            self._skipped_on_device.zero_()
        self.tracker = EntropyTracker(self.cfg.beta)
        self.skipped_updates = 0
        self.pruned = other.pruned

    def record_on_device(self, h: torch.Tensor) -> None:
        """A step without an update: the entropy of the logits sampled from."""
        self.on_device.record(h)

    def update_on_device(self, state, forward, before: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One scheduled update for the current token, as ``step`` does it, with alpha decided on the device.
        ``forward()`` is the head for the current token (logits [V], differentiable in dV when grad is on);
        ``before``: the token's pre-update logits where they were not computed by ``forward`` (the first token's
        come from the unpruned prefill). Returns (logits to sample from, their entropy, alpha) on the device."""
        alpha = None if before is None else self.on_device.preview(entropy(before))[2]
        for _ in range(self.cfg.steps):
            with torch.enable_grad():
                logits = forward()
                if alpha is None:
                    alpha = self.on_device.preview(entropy(logits.detach()))[2]
                h = entropy(logits)
                loss = alpha.to(h.dtype) * (math.log(logits.shape[-1]) - h)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
            self._guarded_step(loss)
            self.write_cache(state)
        with torch.no_grad():
            logits = forward()
        h = entropy(logits)
        self.on_device.record(h)
        return logits, h, alpha

    def _guarded_step(self, loss: torch.Tensor) -> None:
        """``opt.step()`` kept only where finite, decided on the device: a non-finite loss or gradient leaves
        dV and the optimizer state as they were; a non-finite result restores dV (as ``_update`` does)."""
        state = [t for t in self.opt.state.get(self.delta, {}).values() if torch.is_tensor(t)]
        grad = self.delta.grad
        good_in = torch.isfinite(loss) & torch.isfinite(grad).all()
        saved = [t.clone() for t in state]
        last = self.delta.detach().clone()
        self.opt.step()
        with torch.no_grad():
            good = good_in & torch.isfinite(self.delta).all()
            for t, s in zip(state, saved):
                t.copy_(torch.where(good_in, t, s))
            self.delta.copy_(torch.where(good, self.delta, last))
            self._skipped_on_device.add_((~good).long())

    @torch.no_grad()
    def write_cache(self, state) -> None:
        """Put the modulated rows into the head's value cache, in place."""
        values = state.cache.values[state.head_layer]
        values[0].index_copy_(0, self.rows, inject(self.original, self.delta).to(values.dtype))
