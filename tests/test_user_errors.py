"""What a new user hits: every path option, device string and numeric option checked up front, through the
CLI (one line on stderr, exit 1, no traceback, nothing written) and the API (the project's own exception);
outputs checked before any compute; exports readable by others."""

from __future__ import annotations

import math
import stat
import sys

import pytest

from controller import VReasonConfig
from export.__main__ import main as export_main
from models.errors import InputError, UserError
from runtime.__main__ import main as runtime_main
from runtime.bench.__main__ import main as bench_main
from runtime.demo import main as demo_main
from runtime.eval.__main__ import main as eval_main
from runtime.reasoner import Reasoner
from runtime.sampling import SamplingParams
from tests.helpers import one_error_line

Q = ["--question", "Which way?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, engine_dir):
    import cv2

    from models.samples import render_frames, sample_video

    d = tmp_path_factory.mktemp("inputs")
    image = d / "frame.png"
    cv2.imwrite(str(image), render_frames("circle", "red", "right", frames=1, size=(64, 64))[0])
    video = sample_video(d / "clip.mp4", seconds=1.0)
    (d / "folder").mkdir()
    return {"engine": str(engine_dir), "image": str(image), "video": str(video), "dir": str(d / "folder"),
            "missing": str(d / "missing.mp4"), "root": d}


def runtime_cases(f):
    base = ["--engine", f["engine"], "--image", f["image"], *Q]
    return [
        (base + ["--device", "gpu"], "not a device"),
        (base + ["--device", "cuda:7"], "cuda"),
        (["--engine", f["engine"], "--image", f["image"], "--question-file", f["dir"]], "is a folder"),
        (["--engine", f["engine"], "--video", f["missing"], *Q], "does not exist"),
        (["--engine", f["engine"], "--video", f["dir"], *Q], "is a folder"),
        (["--engine", f["engine"], "--frames", f["image"], *Q], "is not a folder"),
        (["--engine", f["dir"] + "/nope", "--image", f["image"], *Q], "does not exist"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--fps", "0"], "fps must be"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--fps", "-1"], "fps must be"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--fps", "nan"], "fps must be"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--fps", "inf"], "fps must be"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--max-frames", "0"], "max_frames must be"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--max-frames", "-2"], "max_frames must be"),
        (["--engine", f["engine"], "--video", f["video"], *Q, "--max-frames", "100000"], "max_frames must be"),
        (base + ["--max-new-tokens", "0"], "max_new_tokens must be"),
        (base + ["--temperature", "-1"], "temperature must be"),
        (base + ["--temperature", "nan"], "temperature must be"),
        (base + ["--top-p", "0"], "top_p must be"),
        (base + ["--top-p", "1.5"], "top_p must be"),
        (base + ["--min-p", "1"], "min_p must be"),
        (base + ["--top-k", "-1"], "top_k must be"),
        (base + ["--seed", "-3"], "seed must be"),
        (base + ["--vreason-beta", "1"], "vreason beta must be"),
        (base + ["--vreason-beta", "nan"], "vreason beta must be"),
        (base + ["--vreason-every", "0"], "vreason every must be"),
        (base + ["--vreason-steps", "-1"], "vreason steps must be"),
        (base + ["--vreason-lr", "nan"], "vreason lr must be"),
        (base + ["--vreason-lr", "-1"], "vreason lr must be"),
        (base + ["--vreason-adam-eps", "0"], "adam_eps must be"),
        (base + ["--vreason-adam-beta2", "inf"], "adam_beta2 must be"),
        (base + ["--lite-ratio", "1"], "lite ratio must be"),
        (base + ["--stream", "--json"], "do not combine"),
        (base + ["--plot", f["dir"]], "is a folder"),
        (base + ["--plot", str(f["root"] / "trace.txt")], "must end in .png"),
        (base + ["--backend", "torch", "--model", f["dir"]], "--model"),
    ]


def check_one_line(capsys, code):
    line, out = one_error_line(capsys, code)
    assert line.startswith("error: ") and out == ""
    return line


def test_runtime_cli_refuses_bad_values_in_one_line(files, capsys):
    for argv, want in runtime_cases(files):
        line = check_one_line(capsys, runtime_main(argv))
        assert want in line, (argv, line)
    assert not list(files["root"].glob("*.png")) or [p.name for p in files["root"].glob("*.png")] == ["frame.png"]


def test_plot_needs_matplotlib_before_any_compute(files, capsys, monkeypatch, tmp_path):
    import runtime.reasoner as rr

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(rr.Reasoner, "load", classmethod(lambda *a, **k: pytest.fail("loaded before the check")))
    code = runtime_main(["--engine", files["engine"], "--image", files["image"], *Q, "--plot", str(tmp_path / "t.png")])
    assert "needs matplotlib" in check_one_line(capsys, code)
    assert not (tmp_path / "t.png").exists()


def test_export_cli_refuses_bad_values_and_writes_nothing(files, tiny, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["--model", str(tiny), "--out", str(out)]
    for argv, want in [
        (base + ["--device", "gpu"], "not a device"),
        (base + ["--device", "cuda:3"], "cuda"),
        (["--model", files["missing"], "--out", str(out)], "does not exist"),
        (["--model", files["image"], "--out", str(out)], "is not a folder"),
        (base + ["--max-context", "0"], "--max-context must be"),
        (base + ["--max-prompt", "9000"], "--max-prompt must be"),
        (base + ["--max-frames", "0"], "--max-frames must be"),
        (base + ["--max-vision-patches", "-5"], "--max-vision-patches"),
        (base + ["--opset", "25"], "--opset must be"),
        (["--check", files["missing"]], "does not exist"),
        (["--check", files["image"]], "is not a folder"),
    ]:
        line = check_one_line(capsys, export_main(argv))
        assert want in line, (argv, line)
        assert not out.exists()


def test_eval_and_bench_and_demo_refuse_bad_values(files, tmp_path, capsys):
    out = tmp_path / "results"
    ev = ["--engine", files["engine"], "--sample", "--out", str(out)]
    for argv, want in [
        (["--engine", files["engine"], "--data", files["dir"], "--out", str(out)], "is a folder"),
        (["--engine", files["engine"], "--data", files["missing"], "--out", str(out)], "does not exist"),
        (ev + ["--video-root", files["missing"]], "does not exist"),
        (ev + ["--max-new-tokens", "0"], "--max-new-tokens must be"),
        (ev + ["--fps", "nan"], "--fps must be"),
        (ev + ["--max-frames", "-1"], "--max-frames must be"),
        (ev + ["--vreason-lr", "nan"], "vreason lr must be"),
        (ev + ["--temperature", "inf"], "temperature must be"),
        (["--engine", files["engine"], "--sample", "--out", files["image"]], "is a file"),
    ]:
        line = check_one_line(capsys, eval_main(argv))
        assert want in line, (argv, line)
        assert not out.exists()
    for argv, want in [
        (["--engine", files["missing"]], "does not exist"),
        (["--synthetic", "small", "--device", "gpu"], "not a device"),
        (["--synthetic", "small", "--device", "cpu", "--new-tokens", "1"], "--new-tokens must be"),
        (["--synthetic", "small", "--device", "cpu", "--repeats", "0"], "--repeats must be"),
    ]:
        line = check_one_line(capsys, bench_main(argv))
        assert want in line, (argv, line)
    assert "--max-new-tokens must be" in check_one_line(capsys, demo_main(["--max-new-tokens", "0",
                                                                           "--out", str(tmp_path / "d")]))


def test_api_checks_the_same_ranges(engine_dir, files):
    r = Reasoner.load(engine_dir)
    for kw, want in [(dict(fps=0), "fps"), (dict(fps=math.nan), "fps"), (dict(max_frames=0), "max_frames"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens")]:
        with pytest.raises(InputError, match=want):
            r.prepare(question="q", video=files["video"], **kw)
    for bad in (dict(temperature=math.nan), dict(top_p=0.0), dict(top_k=-1), dict(min_p=math.inf)):
        with pytest.raises(InputError):
            SamplingParams(**bad).validate()
    for bad in (dict(lr=math.nan), dict(beta=1.0), dict(every=0), dict(lite_ratio=-0.1), dict(adam_eps=0.0)):
        with pytest.raises(InputError):
            VReasonConfig(**bad)
    with pytest.raises(UserError, match="not a device"):
        Reasoner.load(engine_dir, device="gpu")
    from export.exporter import Limits
    with pytest.raises(InputError, match="--max-prompt"):
        Limits(max_context=100, max_prompt=100)


def test_export_files_are_readable_by_others(engine_dir):
    for p in engine_dir.iterdir():
        if p.is_file():
            assert p.stat().st_mode & stat.S_IROTH, p.name  # head.safetensors included (it was 0600)


def test_quiet_export_prints_nothing_and_check_says_its_graphs_were_not_validated(tiny, tmp_path, capsys):
    assert export_main(["--model", str(tiny), "--out", str(tmp_path / "q"), "--quiet", "--no-validate"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert export_main(["--check", str(tmp_path / "q")]) == 0
    assert "NOT validated: --no-validate" in capsys.readouterr().out


def test_every_cli_shows_each_flags_meaning_and_default(capsys):
    from export.__main__ import parser as export_parser
    from runtime.__main__ import parser as runtime_parser
    from runtime.eval.__main__ import parser as eval_parser

    for ap in (runtime_parser(), export_parser(), eval_parser()):
        for action in ap._actions:
            if action.option_strings and action.option_strings != ["-h", "--help"]:
                assert action.help, f"{ap.prog} {action.option_strings} has no help"
        text = ap.format_help()
        assert "(default " in text
        assert ap.description.endswith(".") or ap.description.endswith(")")


def test_control_bytes_are_escaped_on_a_terminal():
    from runtime.__main__ import printable

    assert printable("a\x02b\x1b[31mc\nd") == "a\\x02b\\x1b[31mc\nd"


@pytest.mark.parametrize("name", ["models", "export", "controller"])
def test_an_apps_package_that_shadows_the_projects_is_named_in_one_line(tmp_path, name):
    """An app with its own top-level package of one of the project's names, first on sys.path (its own folder):
    ``import runtime`` says which package shadows which, and the way out, instead of a missing submodule."""
    import subprocess
    import sys

    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    done = subprocess.run([sys.executable, "-c", "from runtime import Reasoner"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1
    assert last.startswith(f"ImportError: the package '{name}' Python finds ({tmp_path / name}) is not vreason-edge's")
    assert "Rename the app's package" in last


def test_the_error_classes_an_app_catches_come_from_runtime():
    import runtime
    from export.manifest import ExportError
    from models.errors import CheckpointError, InputError, UserError

    assert runtime.InputError is InputError and runtime.ExportError is ExportError
    assert runtime.CheckpointError is CheckpointError and issubclass(runtime.SourceError, UserError)
