"""V-Reason: inference-time optimization of the last layer's value cache (see docs/vreason.md).

Works on torch tensors and a head callable; knows no backend. ``runtime`` drives it between engine calls.
"""

from __future__ import annotations

from controller.config import VReasonConfig
from controller.lite import lite_keep, video_token_scores
from controller.tracker import EntropyTracker
from controller.vreason import VReason, entropy, inject, switching_loss

__all__ = ["EntropyTracker", "VReason", "VReasonConfig", "entropy", "inject", "lite_keep", "switching_loss",
           "video_token_scores"]
