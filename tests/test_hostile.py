"""Exports and inputs from strangers: each hostile case gives one line and exit 1 (or runs, where noted), reads
nothing outside the export folder, and leaves nothing behind. A hostile author can re-hash what they change
(``rehash``), so the checks that matter are the ones a valid manifest cannot vouch for."""

from __future__ import annotations

import json
import shutil

import pytest

from export.__main__ import main as export_main
from export.manifest import MANIFEST, file_entries
from models.errors import InputError
from models.samples import sample_video
from runtime.__main__ import main as runtime_main
from runtime.reasoner import Reasoner
from tests.helpers import one_error_line


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return sample_video(tmp_path_factory.mktemp("hostile-clip") / "c.mp4", seconds=2)


@pytest.fixture
def export(engine_dir, tmp_path):
    """A private copy of the tiny export to tamper with."""
    d = tmp_path / "export"
    shutil.copytree(engine_dir, d)
    return d


def manifest(d):
    return json.loads((d / MANIFEST).read_text())


def write_manifest(d, data, rehash=False):
    if rehash:
        data["files"] = file_entries(d)
    (d / MANIFEST).write_text(json.dumps(data))


def one_line(capsys, code, expected_code=1) -> str:
    return one_error_line(capsys, code, expected_code)[0]


def check(d, capsys) -> str:
    return one_line(capsys, export_main(["--check", str(d)]))


def run(d, clip, capsys, *extra) -> str:
    code = runtime_main(["--engine", str(d), "--video", str(clip), "--question", "What moves?", "--max-new-tokens",
                         "2", *extra])
    return one_line(capsys, code)


@pytest.mark.parametrize("name", ["/etc/hostname", "../x", "sub/../../x"])
def test_manifest_names_outside_the_folder(export, clip, capsys, name):
    data = manifest(export)
    data["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    write_manifest(export, data)
    assert "not a plain file name inside the folder" in check(export, capsys)
    assert "not a plain file name inside the folder" in run(export, clip, capsys)


def test_symlinked_tokenizer_pointing_outside(export, clip, capsys, tmp_path):
    outside = tmp_path / "secret.json"
    shutil.copy(export / "tokenizer.json", outside)  # identical bytes: only the link gives it away
    (export / "tokenizer.json").unlink()
    (export / "tokenizer.json").symlink_to(outside)
    assert "tokenizer.json: a symbolic link" in check(export, capsys)
    assert "symbolic link" in run(export, clip, capsys, "--no-verify")


def test_symlinked_head_to_an_identical_file(export, capsys, tmp_path):
    outside = tmp_path / "head.safetensors"
    shutil.copy(export / "head.safetensors", outside)
    (export / "head.safetensors").unlink()
    (export / "head.safetensors").symlink_to(outside)
    assert "head.safetensors: a symbolic link" in check(export, capsys)


def test_unlisted_chat_template_added_after_export(export, clip, capsys):
    data = manifest(export)
    del data["files"]["chat_template.jinja"]  # the file stays: as if dropped in after the export
    write_manifest(export, data)
    line = check(export, capsys)
    assert "chat_template.jinja: in the folder but not in the manifest" in line
    assert "not in the manifest" in run(export, clip, capsys, "--no-verify")


def test_external_data_outside_the_folder(export, capsys):
    import onnx

    m = onnx.load(str(export / "trunk.onnx"))
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="/etc/hostname")
    onnx.save(m, str(export / "trunk.onnx"))
    write_manifest(export, manifest(export), rehash=True)
    assert "external data '/etc/hostname' is not a file listed in the manifest" in check(export, capsys)


@pytest.mark.parametrize("template, why", [
    ("{{ 'x' * 10**9 }}", "sandbox forbids"),
    ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "over its budget"),
    ("{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "over its budget"),
    ("{{ '{:>1000000000}'.format('x') }}", "sandbox forbids"),
])
def test_hostile_chat_templates(export, clip, capsys, template, why):
    (export / "chat_template.jinja").write_text(template)
    write_manifest(export, manifest(export), rehash=True)
    assert why in run(export, clip, capsys)


def test_limits_asking_for_a_huge_cache(export, clip, capsys):
    data = manifest(export)
    data["limits"]["max_context"] = 10**12
    write_manifest(export, data)
    assert "limits.max_context must be an integer in [1, 1048576]" in run(export, clip, capsys)
    data["limits"]["max_context"] = 1 << 20  # within the ceiling, but the cache would not fit this machine
    data["config"]["text"]["num_key_value_heads"] = 1
    data["config"]["text"]["hidden_size"] = 1 << 16
    data["config"]["text"]["num_attention_heads"] = 1
    data["config"]["text"]["mrope_section"] = [1 << 14, 1 << 13, 1 << 13]
    write_manifest(export, data)
    assert "needs a KV cache of" in run(export, clip, capsys, "--no-verify")


@pytest.mark.parametrize("field, value, why", [
    ("limits", {"max_frames": "lots"}, "limits.max_frames must be an integer"),
    ("files", [], "files must be a JSON object"),
    ("config", {"text": {"patch_size": 0}}, "stored config is malformed"),
])
def test_wrong_typed_manifest_fields(export, clip, capsys, field, value, why):
    data = manifest(export)
    if field == "limits":
        data["limits"].update(value)
    else:
        data[field] = value
    write_manifest(export, data)
    assert why in check(export, capsys)
    assert why in run(export, clip, capsys)


def test_manifest_that_is_not_an_object(export, clip, capsys):
    (export / MANIFEST).write_text("[]")
    assert "not an object" in check(export, capsys)
    assert "not an object" in run(export, clip, capsys)


def test_config_with_a_zero_patch_size(export, clip, capsys):
    data = manifest(export)
    data["config"]["vision"]["patch_size"] = 0
    write_manifest(export, data)
    assert "patch_size must be an integer in [1," in run(export, clip, capsys)


@pytest.mark.parametrize("name, content, why", [
    ("tokenizer.json", "{not json", "not a readable tokenizer file"),
    ("preprocessor_config.json", "{not json", "preprocessor_config.json is not valid JSON"),
    ("video_preprocessor_config.json", '{"patch_size": 0}', "patch_size must be an integer >= 1"),
    ("head.safetensors", "garbage", "not a readable safetensors file"),
])
def test_corrupt_files_re_hashed(export, clip, capsys, name, content, why):
    (export / name).write_text(content)
    write_manifest(export, manifest(export), rehash=True)
    assert why in run(export, clip, capsys)


def test_corrupt_onnx_graph_re_hashed(export, clip, capsys):
    (export / "vision.onnx").write_bytes(b"\x08\x07garbage")
    write_manifest(export, manifest(export), rehash=True)
    assert "vision.onnx" in run(export, clip, capsys)


def test_force_replaces_only_an_export_or_an_empty_folder(tiny, tmp_path, capsys):
    target = tmp_path / "home"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code = export_main(["--model", str(tiny), "--out", str(target), "--force", "--quiet", "--no-validate"])
    assert "not an export made by this project" in one_line(capsys, code)
    assert (target / "notes.txt").read_text() == "mine"  # untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main(["--model", str(tiny), "--out", str(empty), "--force", "--quiet", "--no-validate"]) == 0
    assert (empty / MANIFEST).is_file()


def test_checkpoint_template_linking_outside(tiny, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    private = tmp_path / "private.txt"
    private.write_text("a private file")
    (ckpt / "chat_template.jinja").unlink()
    (ckpt / "chat_template.jinja").symlink_to(private)
    out = tmp_path / "out"
    code = export_main(["--model", str(ckpt), "--out", str(out), "--quiet", "--no-validate"])
    assert "outside the checkpoint folder" in one_line(capsys, code)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))  # nothing written, nothing left


def test_shard_names_confined(tiny, tmp_path):
    from models.checkpoint import weight_files
    from models.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        weight_files(ckpt)


def test_unknown_controller_setting_is_named(engine_dir, clip):
    r = Reasoner.load(engine_dir, backend="ort")
    with pytest.raises(InputError, match="unknown controller setting.*'learning_rate'.*valid: beta"):
        r.ask(video=clip, question="What moves?", method="vreason", controller={"learning_rate": 1})


def test_unexpected_errors_are_one_line_and_debug_shows_them(engine_dir, clip, capsys, monkeypatch):
    from runtime import reasoner

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(reasoner.Reasoner, "ask", boom)
    monkeypatch.setattr(reasoner.Reasoner, "stream", boom)
    code = runtime_main(["--engine", str(engine_dir), "--video", str(clip), "--question", "q", "--json"])
    line = one_line(capsys, code, expected_code=2)
    assert line == "internal error: ZeroDivisionError: a bug (run with --debug for the traceback)"
    with pytest.raises(ZeroDivisionError):
        runtime_main(["--engine", str(engine_dir), "--video", str(clip), "--question", "q", "--json", "--debug"])
