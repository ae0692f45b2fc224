"""Qwen2.5-VL: config, vision encoder, trunk/head decoder split, M-RoPE positions, export spec."""

from __future__ import annotations

from models.qwen2_5_vl.config import Qwen25VLConfig as Config
from models.qwen2_5_vl.model import Qwen25VL, load_model
from models.qwen2_5_vl.positions import VisualSpan, mrope_positions
from models.qwen2_5_vl.spec import export_spec

__all__ = ["Config", "Qwen25VL", "VisualSpan", "export_spec", "load_model", "mrope_positions"]
