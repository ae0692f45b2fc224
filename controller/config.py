"""V-Reason settings: one dataclass, its defaults (see docs/vreason.md for which come from the paper), and the
command-line options generated from it (``--vreason-<field>``, ``--lite-ratio``, ``--lite-score``)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

METHODS = ("base", "vreason", "vreason-lite")  # decoding methods: none, V-Reason, V-Reason Lite
LITE_SCORES = ("mean_value_norm",)
OPTIMIZERS = ("adam", "sgd")


@dataclass
class VReasonConfig:
    beta: float = 0.9  # EMA factor of the entropy [paper: an EMA; value: choice]
    every: int = 2  # update every k-th generated token [paper: k = 2 shown]
    steps: int = 1  # optimizer steps per update [paper: "a few"; value: choice]
    optimizer: str = "adam"  # [choice]
    lr: float = 1e-3  # [choice]
    adam_beta1: float = 0.9  # [choice]
    adam_beta2: float = 0.999  # [choice]
    adam_eps: float = 1e-8  # [choice]
    lite_ratio: float = 0.5  # fraction of video tokens Lite drops [paper: 50%]
    lite_score: str = "mean_value_norm"  # value L2 norm, mean over layers and heads [choice]

    def __post_init__(self) -> None:
        from models.checks import check_number
        from models.errors import InputError

        check_number("vreason beta", self.beta, lo=0, hi=1, hi_open=True)
        self.every = check_number("vreason every", self.every, lo=1, integer=True)
        self.steps = check_number("vreason steps", self.steps, lo=0, integer=True)
        check_number("vreason lr", self.lr, lo=0)
        check_number("vreason adam_beta1", self.adam_beta1, lo=0, hi=1, hi_open=True)
        check_number("vreason adam_beta2", self.adam_beta2, lo=0, hi=1, hi_open=True)
        check_number("vreason adam_eps", self.adam_eps, lo=0, lo_open=True)
        check_number("lite ratio", self.lite_ratio, lo=0, hi=1, hi_open=True)
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"vreason optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lite_score not in LITE_SCORES:
            raise InputError(f"lite score must be one of {', '.join(LITE_SCORES)}, got {self.lite_score!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_fields(cls, given: dict) -> VReasonConfig:
        """From a dict of field values; an unknown name is refused with the valid ones listed."""
        from models.errors import InputError

        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InputError(f"unknown controller setting(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(names)}")
        return cls(**given)


HELP = {
    "beta": "EMA factor of the per-token entropy", "every": "update the controller every k-th token",
    "steps": "optimizer steps per update", "optimizer": "optimizer of Delta V", "lr": "learning rate of Delta V",
    "adam_beta1": "Adam beta1", "adam_beta2": "Adam beta2", "adam_eps": "Adam epsilon",
    "lite_ratio": "fraction of video tokens vreason-lite drops after prefill",
    "lite_score": "how vreason-lite scores video tokens",
}


def _flag(name: str) -> str:
    return "--" + (name if name.startswith("lite_") else "vreason_" + name).replace("_", "-")


def add_cli_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("V-Reason controller (methods vreason and vreason-lite)")
    for f in fields(VReasonConfig):
        choices = {"optimizer": OPTIMIZERS, "lite_score": LITE_SCORES}.get(f.name)
        g.add_argument(_flag(f.name), dest=f"ctl_{f.name}", type=type(f.default), default=None, choices=choices,
                       metavar=None if choices else f.name.split("_")[-1].upper(),
                       help=f"{HELP[f.name]} (default {f.default})")


def config_from_args(args: argparse.Namespace) -> VReasonConfig:
    given = {f.name: getattr(args, f"ctl_{f.name}") for f in fields(VReasonConfig)
             if getattr(args, f"ctl_{f.name}", None) is not None}
    return VReasonConfig(**given)
