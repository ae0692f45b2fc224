"""python -m export on a tiny checkpoint: contract, parity, precision, check, atomicity, TensorRT compatibility."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.__main__ import main as export_main
from export.exporter import export_model
from export.manifest import ExportError, check_export, read_manifest
from export.tensorrt_build import trunk_profiles, vision_profiles
from export.trt_compat import check_graph
from export.validate import compare, trunk_cases, vision_cases
from models import load_model
from models.qwen2_5_vl.model import load_head
from models.qwen2_5_vl.spec import TrunkGraph, trunk_io_names
from models.qwen2_5_vl.vision import VISION_INPUTS


@pytest.fixture
def exported(engine_dir):
    return engine_dir


def test_graph_io_matches_the_contract(exported, tiny):
    cfg = load_model(tiny).cfg
    t = cfg.text
    ins, outs = trunk_io_names(t.num_hidden_layers - 1)
    trunk = onnx.load(str(exported / "trunk.onnx"))
    got_in = {v.name: v.type.tensor_type for v in trunk.graph.input}
    assert list(got_in) == ins and [v.name for v in trunk.graph.output] == outs
    dims = {n: [d.dim_param or d.dim_value for d in tt.shape.dim] for n, tt in got_in.items()}
    assert dims["inputs_embeds"] == ["batch", "seq", t.hidden_size]
    assert dims["position_ids"] == [3, "batch", "seq"]
    assert dims["cache_length"] == ["batch"] and got_in["cache_length"].elem_type == TensorProto.INT64  # per row
    assert dims["past_key.0"] == ["batch", "past", t.num_key_value_heads, t.head_dim]
    assert got_in["position_ids"].elem_type == TensorProto.INT64
    assert got_in["inputs_embeds"].elem_type == TensorProto.FLOAT
    out_dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in trunk.graph.output}
    assert out_dims["key.1"] == ["batch", "seq", t.num_key_value_heads, t.head_dim]
    vision = onnx.load(str(exported / "vision.onnx"))
    assert [v.name for v in vision.graph.input] == list(VISION_INPUTS)
    assert [v.name for v in vision.graph.output] == ["embeds"]


def test_onnx_runtime_matches_pytorch(exported, tiny):
    model = load_model(tiny)
    ins, _ = trunk_io_names(model.trunk.num_layers)
    rows = compare("trunk", exported / "trunk.onnx", TrunkGraph(model.trunk), trunk_cases(model, torch.float32, seed=5),
                   ins, "fp32")
    rows += compare("vision", exported / "vision.onnx", model.visual, vision_cases(model, torch.float32, seed=5),
                    list(VISION_INPUTS), "fp32")
    assert {r.case for r in rows} >= {"prefill P=0 S=7", "decode S=1 P=9", "P=0 S=1", "static S=1 P=12 L=9"}
    assert all(r.ok and r.max_abs_diff <= 1e-4 for r in rows), [r for r in rows if not r.ok]
    report = read_manifest(exported)["validation"]
    assert report["status"] == "passed" and len(report["rows"]) == len(rows)


def test_head_safetensors_reproduces_the_models_head(exported, tiny):
    model = load_model(tiny)
    head = load_head(model.cfg, exported / "head.safetensors")
    t = model.cfg.text
    hidden = torch.randn(1, 3, t.hidden_size)
    pos = torch.arange(3).view(1, 1, 3).expand(3, 1, 3)
    empty = model.decoder.empty_cache()
    assert torch.equal(head(hidden, pos, empty, empty)[0], model.head(hidden, pos, empty, empty)[0])


def test_fp16_export_validates_with_its_tolerance(tiny, tmp_path):
    out = export_model(tiny, tmp_path / "fp16", precision="fp16", quiet=True)
    data = read_manifest(out)
    assert data["validation"]["status"] == "passed" and data["validation"]["tolerance"]["atol"] == 2e-2
    trunk = onnx.load(str(out / "trunk.onnx"))
    assert trunk.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert max(r["max_abs_diff"] for r in data["validation"]["rows"]) > 0  # really compared fp16 numbers


def test_check_passes_and_catches_tampering(exported, tmp_path):
    assert check_export(exported)["model_type"] == "qwen2_5_vl"
    bad = tmp_path / "tampered"
    shutil.copytree(exported, bad)
    data = bytearray((bad / "head.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="head.safetensors: sha256 differs"):
        check_export(bad)
    (bad / "vision.onnx").unlink()
    with pytest.raises(ExportError, match="vision.onnx: missing"):
        check_export(bad)


def test_check_refuses_other_format_versions(exported, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="format version 0"):
        check_export(old)


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    import export.exporter as ex

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "name_dynamic_dims", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny, tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_reexport_without_force_refuses(exported, tiny, capsys):
    assert export_main(["--model", str(tiny), "--out", str(exported)]) == 1
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and "Traceback" not in err


def test_cli_check_reports_one_line(tmp_path, capsys):
    assert export_main(["--check", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --check") and "does not exist" in err and "\n" not in err


def test_compat_check_passes_on_exported_graphs(exported):
    assert check_graph(exported / "trunk.onnx") == []
    assert check_graph(exported / "vision.onnx") == []
    findings = read_manifest(exported)["tensorrt_compat"]["findings"]
    assert findings == {"vision": [], "trunk": []}


def test_compat_check_names_the_unsupported_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    z = helper.make_tensor_value_info("z", TensorProto.DOUBLE, [2, 2])
    nodes = [helper.make_node("Det", ["x"], ["y"], name="/model/bad_det"),
             helper.make_node("Cast", ["x"], ["z"], to=TensorProto.DOUBLE, name="/model/to_double")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    findings = [str(f) for f in check_graph(tmp_path / "bad.onnx")]
    assert any(f.startswith("/model/bad_det (Det): operator not supported") for f in findings)
    assert any("z" in f and "DOUBLE" in f for f in findings)


def test_tensorrt_profiles_cover_prefill_and_decode():
    prefill, decode, suffix = trunk_profiles(64, 2, 16, 2, max_prompt=100, max_context=200, max_batch=8)
    lo, opt, hi = prefill.shapes["inputs_embeds"]
    assert lo == (1, 1, 64) and hi == (1, 100, 64)
    assert prefill.shapes["past_key.1"] == ((1, 0, 2, 16),) * 3
    # decode: one token for each of 1..max_batch rows (requests decoded together) over a past of 1..max_context
    # entries (the filled cache, the whole static one, or a pool's rows, each with its cache_length)
    assert decode.shapes["inputs_embeds"] == ((1, 1, 64), (4, 1, 64), (8, 1, 64))
    assert decode.shapes["position_ids"] == ((3, 1, 1), (3, 4, 1), (3, 8, 1))
    assert decode.shapes["past_value.0"][0] == (1, 1, 2, 16) and decode.shapes["past_value.0"][2] == (8, 200, 2, 16)
    assert decode.shapes["cache_length"] == ((1,), (4,), (8,))
    assert prefill.shapes["cache_length"] == suffix.shapes["cache_length"] == ((1,),) * 3  # a prefill is one row
    # suffix: S >= 2 new tokens on a past of >= 1 (a reused prompt prefix, a later prefill chunk); together the
    # three profiles cover every (S, P) that select_profile asks for, within the prompt limit
    assert suffix.shapes["inputs_embeds"][0] == (1, 2, 64) and suffix.shapes["inputs_embeds"][2] == (1, 99, 64)
    assert suffix.shapes["past_key.0"][0] == (1, 1, 2, 16) and suffix.shapes["past_key.0"][2] == (1, 99, 2, 16)
    assert trunk_profiles(64, 2, 16, 2, 100, 200)[1].shapes["cache_length"] == ((1,),) * 3  # max_batch 1
    (vis,) = vision_profiles(1176, 2, max_patches=1024, max_frame_patches=64)
    assert vis.shapes["window_index"][2] == (256,) and vis.shapes["pixel_values"][2] == (1024, 1176)


@pytest.mark.tensorrt
def test_tensorrt_engines_build(exported, tmp_path):
    trt = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from export.exporter import Limits, build_all
    from models.qwen2_5_vl import Config

    d = tmp_path / "trt"
    shutil.copytree(exported, d)
    data = read_manifest(d)

    built = build_all(d, Config.from_stored(data["config"]), Limits(**data["limits"]), "fp32")
    assert built["version"] == trt.__version__
    assert (d / "trunk.plan").stat().st_size > 0 and (d / "vision.plan").stat().st_size > 0
