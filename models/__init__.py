"""Model math, checkpoint loading and preprocessing for the supported vision-language models.

The registry maps a checkpoint's ``model_type`` to its family module; adding Qwen2-VL or Qwen3-VL is
one more entry and one more folder.
"""

from __future__ import annotations

from models.errors import CheckpointError, InputError, UserError
from models.registry import SUPPORTED, family_for, load_config, load_model

__all__ = ["CheckpointError", "InputError", "UserError", "SUPPORTED", "family_for", "load_config", "load_model"]
