"""Checkpoints whose parameters are equal (fresh from ``from_config``: biases zeros, norm weights ones). The ONNX
exporter keeps one initializer for tensors of equal value and drops a Gemm's zero bias; the torch backend (the
GPU path) must load such exports all the same, and answer as the ort backend does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.exporter import export_model
from export.graph_weights import weight_aliases, weight_zeros
from export.quantize import Quantization
from models.tiny import make_checkpoint
from runtime import Reasoner

FRAMES = [np.full((64, 64, 3), 30 * i, np.uint8) for i in range(4)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    made = {}

    def get(family, layout):
        if (family, layout) not in made:
            made[family, layout] = make_checkpoint(root / f"{family}-{layout}", family=family, layout=layout,
                                                   fresh=True)
        return made[family, layout]
    return get


@pytest.mark.parametrize("family, layout, scheme", [
    ("qwen2_5_vl", "transformers", "none"), ("qwen2_5_vl", "transformers", "int8"),
    ("qwen2_5_vl", "transformers", "int4"), ("qwen2_5_vl", "original", "none"),
    ("qwen3_vl", "transformers", "none"), ("qwen3_vl", "transformers", "int8"), ("qwen3_vl", "transformers", "int4"),
])
def test_torch_backend_loads_an_export_of_equal_parameters(fresh, family, layout, scheme, tmp_path):
    ckpt = fresh(family, layout)
    quant = None if scheme == "none" else Quantization(scheme, 32)
    engine = export_model(ckpt, tmp_path / "engine", quiet=True, quantization=quant, validate=False)
    vision = onnx.load(str(engine / "vision.onnx"), load_external_data=False)
    trunk = onnx.load(str(engine / "trunk.onnx"), load_external_data=False)
    # the case this covers: weights with no initializer of their own name
    assert weight_aliases(vision) and weight_aliases(trunk)
    ort = Reasoner.load(engine, backend="ort")
    assert ort.backend.trunk_form == "fused"  # the fused form finds the shared norms and biases too
    torch_r = Reasoner.load(engine, backend="torch")
    ask = dict(frames=FRAMES, question="What color is the circle?", max_new_tokens=6, template="plain")
    a, b = ort.ask(**ask), torch_r.ask(**ask)
    assert a.token_ids == b.token_ids
    assert np.allclose(a.entropy, b.entropy, atol=1e-3 if quant else 1e-4)
    if family == "qwen2_5_vl":  # its merger's first linear is a Gemm whose zero bias is dropped
        assert "merger.mlp.0.bias" in weight_zeros(vision)


def test_an_alias_map_that_is_not_one_is_refused(engine_dir):
    from models.errors import CheckpointError

    proto = onnx.load(str(engine_dir / "vision.onnx"), load_external_data=False)
    proto.metadata_props.add(key="weight_aliases", value='["not", "a", "map"]')
    with pytest.raises(CheckpointError, match="weight_aliases"):
        weight_aliases(proto)
