"""Shared fixtures: tiny random checkpoints built once per test session (CPU, fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.tiny import make_checkpoint

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

# two shapes: GQA 4:2 with mrope [2,3,3] (transformers-5 layout) and GQA 4:1 with mrope [4,2,2]
# (original-release layout)
CONFIGS = {
    "gqa2": dict(layout="transformers"),
    "gqa4": dict(layout="original", seed=3,
                 text_overrides=dict(num_key_value_heads=1, rope_parameters={
                     "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, **kw) for name, kw in CONFIGS.items()}


@pytest.fixture(scope="session")
def tiny(checkpoints):
    return checkpoints["gqa2"]


@pytest.fixture(params=sorted(CONFIGS))
def any_checkpoint(request, checkpoints):
    return checkpoints[request.param]


@pytest.fixture(scope="session")
def q3_tiny(tmp_path_factory):
    """A tiny Qwen3-VL checkpoint (transformers-5 layout)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt-q3") / "q3", family="qwen3_vl")


@pytest.fixture(scope="session")
def q3_engine(q3_tiny, tmp_path_factory):
    """The tiny Qwen3-VL checkpoint exported once (fp32)."""
    from export.exporter import export_model

    return export_model(q3_tiny, tmp_path_factory.mktemp("q3-engine") / "fp32", quiet=True)


@pytest.fixture(scope="session")
def engine_dir(tiny, tmp_path_factory):
    """The tiny checkpoint exported once (fp32) for every test that needs an export directory."""
    from export.exporter import export_model

    return export_model(tiny, tmp_path_factory.mktemp("engine") / "fp32", quiet=True)


@pytest.fixture(scope="session")
def int4_engine(tiny, tmp_path_factory):
    """The tiny checkpoint exported int4 (blocks of 32)."""
    from export.exporter import export_model
    from export.quantize import Quantization

    return export_model(tiny, tmp_path_factory.mktemp("engine") / "int4", quiet=True,
                        quantization=Quantization("int4", 32))
