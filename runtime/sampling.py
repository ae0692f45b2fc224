"""Sampling: a pure function of the logits, computed where they live. ``entropy`` is the controller's, so
the traces of every method use one definition."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from controller.vreason import entropy  # noqa: F401  (one definition: the controller's)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        from models.checks import check_number

        check_number("temperature", self.temperature, lo=0)
        self.top_k = check_number("top_k", self.top_k, lo=0, integer=True)
        check_number("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        check_number("min_p", self.min_p, lo=0, hi=1, hi_open=True)
        self.seed = check_number("seed", self.seed, lo=0, integer=True, optional=True)

    def to_dict(self) -> dict:
        return asdict(self)


HELP = {"temperature": "sampling temperature; 0 = greedy", "top_k": "sample from the k most likely tokens (0: off)",
        "top_p": "nucleus sampling mass (1.0: off)", "min_p": "drop tokens below min_p x the top probability",
        "seed": "seed for sampling (temperature > 0)"}


def add_cli_arguments(ap) -> None:
    """--temperature, --top-k, --top-p, --min-p, --seed, generated from SamplingParams (its defaults)."""
    g = ap.add_argument_group("sampling")
    for f in fields(SamplingParams):
        kind = int if f.name in ("top_k", "seed") else float
        g.add_argument("--" + f.name.replace("_", "-"), dest=f"sampling_{f.name}", type=kind, default=f.default,
                       metavar={"temperature": "T", "top_k": "K", "seed": "N"}.get(f.name, "P"), help=HELP[f.name])


def params_from_args(args) -> SamplingParams:
    p = SamplingParams(**{f.name: getattr(args, f"sampling_{f.name}") for f in fields(SamplingParams)})
    p.validate()
    return p


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id (0-dim long tensor, on the logits' device) from logits [V]."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    z = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(z, min(params.top_k, z.shape[-1])).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs / probs.sum(), 1, generator=generator)[0]
