"""Entropy traces of one answer: per-token entropy H_k, its EMA E_k, the running peak P_k of the EMA.

E_k = beta * E_{k-1} + (1 - beta) * H_k with E_0 = H_0; P_k = max(E_0..E_k). The switch sign
alpha = -1 if E < P else +1 (before the EMA peaks: explore; after: exploit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class EntropyTracker:
    beta: float = 0.9
    entropy: list[float] = field(default_factory=list)
    ema: list[float] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    peak: float = -math.inf

    def preview(self, h: float) -> tuple[float, float, float]:
        """(E, P, alpha) the tracker would have if the current token's entropy were ``h``; no state change."""
        e = h if not self.ema else self.beta * self.ema[-1] + (1 - self.beta) * h
        p = max(self.peak, e)
        return e, p, (-1.0 if e < p else 1.0)

    def record(self, h: float, alpha: float) -> None:
        e, p, _ = self.preview(h)
        self.entropy.append(h)
        self.ema.append(e)
        self.alpha.append(alpha)
        self.peak = p


class DeviceTracker:
    """The tracker's running state (E, P, started) as 0-dim float64 tensors on the logits' device, so that
    alpha is decided there and an update needs no host sync (a CUDA graph can replay it). The arithmetic is
    the host tracker's, in the same precision and order, so both decide the same alpha; the traces
    themselves are rebuilt on the host from H and alpha at the end of an answer."""

    def __init__(self, beta: float, device) -> None:
        import torch

        self.beta = beta
        self.ema = torch.zeros((), dtype=torch.float64, device=device)
        self.peak = torch.full((), -math.inf, dtype=torch.float64, device=device)
        self.started = torch.zeros((), dtype=torch.bool, device=device)

    def reset(self) -> None:
        """Back to no token seen, in place (captured graphs keep reading these tensors)."""
        self.ema.zero_()
        self.peak.fill_(-math.inf)
        self.started.fill_(False)

    def preview(self, h):
        """(E, P, alpha) tensors for the current token's entropy ``h`` (a 0-dim tensor); no state change."""
        import torch

        h = h.double()
        e = torch.where(self.started, self.beta * self.ema + (1 - self.beta) * h, h)
        p = torch.maximum(self.peak, e)
        return e, p, 1.0 - 2.0 * (e < p).double()

    def record(self, h) -> None:
        e, p, _ = self.preview(h)
        self.ema.copy_(e)
        self.peak.copy_(p)
        self.started.fill_(True)
