"""The runtime: backends, KV cache, decode loop, the ``Reasoner`` API, CLI, plots.

``import runtime`` works on a CPU-only machine without tensorrt or matplotlib; they are imported where used.
"""

from __future__ import annotations

from runtime.reasoner import Reasoner, Result
from runtime.sampling import SamplingParams

__all__ = ["Reasoner", "Result", "SamplingParams"]
