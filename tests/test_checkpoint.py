"""Checkpoint loading: both config layouts, safety, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from models import CheckpointError, InputError, load_config, load_model
from models.preprocess import VisionSettings
from models.samples import sample_video
from models.video import read_frames_dir, read_image, read_video


def test_both_layouts_parse_to_the_same_fields(checkpoints):
    a = load_config(checkpoints["gqa2"])
    b = load_config(checkpoints["gqa4"])
    assert a.layout == "transformers" and b.layout == "original"
    assert a.text.num_key_value_heads == 2 and b.text.num_key_value_heads == 1
    assert a.text.mrope_section == [2, 3, 3] and b.text.mrope_section == [4, 2, 2]
    assert b.text.rope_theta == 10000.0 and a.text.rope_theta == 1e6
    assert a.vision.fullatt_block_indexes == [1, 3] and a.vision.tokens_per_second == 2


def test_sharded_checkpoint_loads(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "sharded"
    shutil.copytree(tiny, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    m = load_model(d, dtype="fp16")
    assert next(m.parameters()).dtype.is_floating_point and m.decoder.embed_tokens.weight.dtype.itemsize == 2


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_weights(tiny, tmp_path):
    d = tmp_path / "noweights"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(d)


def test_pickle_only_checkpoint_is_refused(tiny, tmp_path):
    d = tmp_path / "bin"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(d)


def test_missing_tensor_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    shutil.copytree(tiny, d)
    state = load_file(str(d / "model.safetensors"))
    state.pop("model.language_model.norm.weight")
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.norm.weight"):
        load_model(d)


def test_corrupt_safetensors(tiny, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(d)


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="supported model types: qwen2_5_vl"):
        load_model(d)


def test_video_errors(tmp_path):
    s = VisionSettings()
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "missing.mp4", s)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_video(tmp_path / "empty.mp4", s)
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(InputError, match="video"):
        read_video(tmp_path / "text.mp4", s)
    with pytest.raises(InputError, match="folder"):
        read_video(tmp_path, s)
    (tmp_path / "frames").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        read_frames_dir(tmp_path / "frames")
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(InputError, match="could not be decoded"):
        read_image(tmp_path / "fake.png")


def test_sample_video_decodes(tmp_path):
    p = sample_video(tmp_path / "clip.mp4", seconds=3, fps=10)
    frames, fps = read_video(p, VisionSettings())
    assert len(frames) == 6 and abs(fps - 2.0) < 1e-6
    # resized while decoding, to the size the processor uses for 6 frames of 96x128
    from models.preprocess import video_frame_size

    assert frames[0].shape == (*video_frame_size(96, 128, 6, VisionSettings()), 3) and frames[0].dtype.name == "uint8"
