"""Evaluation harness: answer extraction, metrics, file formats, path safety, resume, the sample set end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.errors import InputError
from runtime.answer import extract_answer
from runtime.eval.__main__ import main as eval_main
from runtime.eval.data import load_samples, resolve_media
from runtime.eval.metrics import mean_relative_accuracy, option_letter, parse_number, score


def test_answer_extraction_and_fallbacks():
    assert extract_answer("<think>hmm</think><answer> B </answer>") == "B"
    assert extract_answer("<answer>A</answer> then <answer>C</answer>") == "C"
    assert extract_answer("<think>x</think><answer>42") == "42"  # unclosed tag
    assert extract_answer("I think the final answer is: 7\nmore") == "7"
    assert extract_answer("<think>long</think> the ball") == "the ball"
    assert extract_answer("  just text ") == "just text"


def test_mra_against_hand_computed_values():
    # thresholds 0.50..0.95; rel error 0.08 < 1 - t holds for t in {0.50, ..., 0.90} (9 of 10)
    assert mean_relative_accuracy(4.32, 4.0) == pytest.approx(0.9)
    # rel 0.25: 1 - t > 0.25 for t in {0.50, 0.55, 0.60, 0.65, 0.70} -> 5 of 10
    assert mean_relative_accuracy(5.0, 4.0) == pytest.approx(0.5)
    assert mean_relative_accuracy(4.0, 4.0) == 1.0
    assert mean_relative_accuracy(9.0, 4.0) == 0.0
    assert mean_relative_accuracy(None, 4.0) == 0.0
    assert mean_relative_accuracy(0.0, 0.0) == 1.0


def test_scores_per_problem_type():
    opts = ["A. the cup", "B. the ball", "C. the box", "D. nothing"]
    assert score("multiple choice", "B", "<answer>B</answer>", opts) == ("acc", 1.0)
    assert score("multiple choice", "(b) the ball", "<answer>B</answer>", opts) == ("acc", 1.0)
    assert score("multiple choice", "the ball", "<answer>B</answer>", opts) == ("acc", 1.0)
    assert score("multiple choice", "C", "<answer>B</answer>", opts) == ("acc", 0.0)
    assert score("numerical", "about 4.32 meters", "<answer>4</answer>") == ("mra", pytest.approx(0.9))
    assert score("free-form", "Red.", "<answer>red</answer>") == ("exact", 1.0)
    assert score("OCR", "STOP sign", "<answer>stop</answer>") == ("exact", 0.0)
    assert option_letter("E", opts) is None and parse_number("1,200.5 m") == 1200.5


def test_json_and_jsonl_load_the_same(tmp_path):
    rows = [{"problem_id": 1, "problem": "q", "solution": "<answer>A</answer>", "path": "a.mp4",
             "problem_type": "multiple choice", "data_type": "video", "options": ["A. x", "B. y"]}]
    (tmp_path / "set.json").write_text(json.dumps(rows))
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = load_samples(tmp_path / "set.json"), load_samples(tmp_path / "set.jsonl")
    assert a == b and a[0].dataset == "set" and a[0].options == ["A. x", "B. y"]
    (tmp_path / "bad.json").write_text(json.dumps([{"problem": "q"}]))
    with pytest.raises(InputError, match="lacks"):
        load_samples(tmp_path / "bad.json")


def test_paths_cannot_escape_the_video_root(tmp_path):
    assert resolve_media(tmp_path, "clips/a.mp4") == (tmp_path / "clips" / "a.mp4").resolve()
    for bad in ("../secret.mp4", "/etc/passwd", "clips/../../x.mp4"):
        with pytest.raises(InputError, match="leaves --video-root"):
            resolve_media(tmp_path, bad)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(InputError, match="leaves --video-root"):
        resolve_media(tmp_path, "link/passwd")


# the tiny checkpoint's export takes frames of at most 112 x 112 pixels (its processor's), far below the video-r1
# protocol's 128*28*28: its runs set a pixel budget that fits
TINY_BUDGET = ["--video-min-pixels", "3136", "--video-max-pixels", "12544"]


def test_sample_set_end_to_end_and_resume(engine_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--engine", str(engine_dir), "--sample", "--out", str(out), "--max-new-tokens", "6",
            *TINY_BUDGET, "--method", "base", "vreason"]
    assert eval_main(args) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 14 * 2
    rec = json.loads(lines[0])
    for key in ("dataset", "id", "index", "method", "answer", "tokens", "metric", "score", "ema", "latency_s", "error",
                "file_sha", "solution", "prompt_tokens", "video_frames", "frame_size"):
        assert key in rec
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert set(methods) == {"base", "vreason"}
    assert set(methods["base"]["datasets"]["shapes"]) == {"acc"}  # video-r1: Acc for every non-regression type
    assert methods["base"]["errors"] == 0 and methods["base"]["avg_tokens"] > 0
    assert summary["settings"]["protocol"] == "video-r1" and summary["settings"]["controller"]["lr"] == 1e-3
    md = (out / "results.md").read_text()
    assert "| Method |" in md and "protocol video-r1" in md and "lr 0.001" in md
    assert (out / "entropy_curves.png").stat().st_size > 0 and (out / "accuracy_vs_tokens.png").stat().st_size > 0
    # a rerun skips what is finished; adding a method runs only that method
    capsys.readouterr()
    assert eval_main(args + ["vreason-lite"]) == 0
    lines2 = (out / "samples.jsonl").read_text().splitlines()
    assert lines2[: len(lines)] == lines and len(lines2) == 14 * 3
    assert "14 to run, 28 done earlier" in capsys.readouterr().err
    # the report shows only what this run asked for
    assert eval_main(args[:-2] + ["base"]) == 0
    assert set(json.loads((out / "summary.json").read_text())["methods"]) == {"base"}


def test_changed_settings_never_mix_with_earlier_results(engine_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--engine", str(engine_dir), "--sample", "--out", str(out), "--max-new-tokens", "4", "--method", "base",
            "--limit", "2", *TINY_BUDGET]
    assert eval_main(args) == 0
    before = (out / "samples.jsonl").read_text()
    for changed, name in ((["--max-new-tokens", "5"], "max_new_tokens"), (["--vreason-lr", "0.5"], "controller"),
                          (["--temperature", "0.7", "--seed", "1"], "sampling"),
                          (["--protocol", "lenient"], "protocol"), (["--max-frames", "2"], "budget")):
        capsys.readouterr()
        assert eval_main(args + changed) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0] and name in err[0] and "--overwrite" in err[0]
        assert "..." not in err[0]  # the fields that differ, not a truncated dump
        assert (out / "samples.jsonl").read_text() == before
    capsys.readouterr()
    assert eval_main(args + ["--vreason-lr", "0.5"]) == 1
    assert "(controller.lr: 0.001 -> 0.5)" in capsys.readouterr().err
    assert eval_main(args + ["--max-new-tokens", "5", "--overwrite"]) == 0
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and json.loads((out / "run.json").read_text())["max_new_tokens"] == 5


def test_a_failed_eval_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert eval_main(["--engine", str(tmp_path), "--sample", "--out", str(out)]) == 1
    assert not out.exists()


def test_video_r1_prompt_is_the_protocols():
    from runtime.eval.protocol import video_r1_prompt

    p = video_r1_prompt("Which way?", "multiple choice", ["A. left", "B. right"])
    assert p.startswith("Which way?Options:\nA. left\nB. right\n\nPlease think about this question as if")
    assert p.endswith("Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> "
                      "</answer> tags.")
    assert video_r1_prompt("How far?", "regression", []).startswith("How far?\nPlease think")


@pytest.mark.parametrize("ptype,output,solution,want", [
    # multiple choice: exact letter after stripping; no tags -> the whole output
    ("multiple choice", "<think>x</think><answer> B </answer>", "<answer>B</answer>", 1.0),
    ("multiple choice", "<answer>B.</answer>", "<answer>B</answer>", 0.0),
    ("multiple choice", "B", "<answer>B</answer>", 1.0),
    ("multiple choice", "The answer is B", "<answer>B</answer>", 0.0),
    ("multiple choice", "<answer>A</answer><answer>B</answer>", "<answer>B</answer>", 0.0),  # the first tag
    # numerical: same decimal-ness, equal at 2 decimals
    ("numerical", "<answer>3</answer>", "<answer>3</answer>", 1.0),
    ("numerical", "<answer>3.0</answer>", "<answer>3</answer>", 0.0),
    ("numerical", "<answer>2.504</answer>", "<answer>2.5</answer>", 1.0),
    ("numerical", "<answer>2.51</answer>", "<answer>2.5</answer>", 0.0),
    ("numerical", "<answer>1,000</answer>", "<answer>1000.0</answer>", 1.0),
    ("numerical", "<answer>three</answer>", "<answer>3</answer>", 0.0),
    # regression: MRA, strict <
    ("regression", "<answer>4.32</answer>", "<answer>4</answer>", 0.9),
    ("regression", "<answer>5</answer>", "<answer>4</answer>", 0.5),
    ("regression", "<answer>6</answer>", "<answer>4</answer>", 0.0),  # rel 0.5 is not < 0.5
    ("regression", "<answer>0</answer>", "<answer>0</answer>", 1.0),  # zero ground truth: the 1e-8 guard
    ("regression", "<answer>0.1</answer>", "<answer>0</answer>", 0.0),
    # OCR: 1 - word error rate; free-form: mean ROUGE-1/2/L F
    ("OCR", "<answer>stop here now</answer>", "<answer>stop here now</answer>", 1.0),
    ("OCR", "<answer>stop there now</answer>", "<answer>stop here now</answer>", 2 / 3),
    ("OCR", "<answer>a b c d e f</answer>", "<answer>x</answer>", 0.0),
    ("free-form", "<answer>the red ball</answer>", "<answer>the red ball</answer>", 1.0),
    ("free-form", "<answer>a red balls</answer>", "<answer>the red ball</answer>", (2 / 3 + 0.5 + 2 / 3) / 3),
])
def test_video_r1_scoring_rules(ptype, output, solution, want):
    """The video-r1-reward protocol (reward=True); plain video-r1 scores OCR and free-form 0, as reward_fn does."""
    from runtime.eval.protocol import video_r1_score

    metric, value = video_r1_score(ptype, output, solution, reward=True)
    assert metric == ("mra" if ptype == "regression" else "acc")
    assert value == pytest.approx(want)
    plain = video_r1_score(ptype, output, solution)[1]
    assert plain == (0.0 if ptype in ("OCR", "free-form") else value)


def test_a_bad_sample_is_recorded_and_the_run_goes_on(engine_dir, tmp_path):
    rows = [{"problem_id": 0, "problem": "q", "solution": "<answer>A</answer>", "path": "../escape.mp4",
             "problem_type": "multiple choice", "data_type": "video", "options": ["A. x"]},
            {"problem_id": 1, "problem": "q", "solution": "<answer>1</answer>", "path": "missing.mp4",
             "problem_type": "numerical", "data_type": "video"}]
    data = tmp_path / "set.json"
    data.write_text(json.dumps(rows))
    assert eval_main(["--engine", str(engine_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                      "--method", "base"]) == 1  # both recorded; nothing answered: exit 1
    recs = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert "leaves --video-root" in recs[0]["error"] and "does not exist" in recs[1]["error"]
    assert all(r["score"] == 0 for r in recs)


# -- Video-R1's numbers: MRA bit for bit, rescoring, its frame and pixel budget, robust runs ------------------

def _mra_float32(pred: float, gt: float) -> float:
    """Video-R1's mean relative accuracy worked out in numpy float32, apart from the project's scorer (which runs
    it in torch, as the script does): rel = |p - g| / (|g| + 1e-8), thresholds 0.50, 0.55, ..., 0.95 each the
    float32 nearest to 0.5 + 0.05 i (what a float32 arange holds), the share of thresholds with rel < 1 - t."""
    f = np.float32
    p, g = f(pred), f(gt)
    rel = np.abs(p - g) / (np.abs(g) + f(1e-8))
    thresholds = [f(0.5 + 0.05 * i) for i in range(10)]
    return sum(bool(rel < f(1) - t) for t in thresholds) / 10


@pytest.mark.parametrize("pred,gt,want", [
    # worked by hand, rel away from every threshold: rel < 1 - t for t in 0.50 ... 0.95, i.e. rel under
    # 0.50, 0.45, ..., 0.05; the score is how many of those ten bounds rel is under, over ten
    (100, 100, 1.0),  # rel 0
    (103, 100, 1.0),  # rel 0.03: under all ten
    (107, 100, 0.9),  # rel 0.07: under 0.50 ... 0.10 (9), not 0.05
    (88, 100, 0.8),  # rel 0.12: under 0.50 ... 0.15 (8)
    (132, 100, 0.4),  # rel 0.32: under 0.50, 0.45, 0.40, 0.35
    (52, 100, 0.1),  # rel 0.48: under 0.50 alone
    (150, 100, 0.0),  # rel 0.50: not under 0.50 (strict <)
    (-96, -100, 1.0),  # rel 0.04: signs cancel
    (0, 0, 1.0),  # zero ground truth: rel 0 / 1e-8
    (1, 0, 0.0),  # rel 1e8
    # on a threshold, where float32 rounding decides: the values Video-R1's script gives (torch float32)
    (9, 10, 0.9), (11, 10, 0.9), (19, 20, 1.0), (21, 20, 1.0), (4.32, 4, 0.9), (1000, 1000.0, 1.0),
])
def test_mra_against_hand_worked_values_and_the_formula(pred, gt, want):
    from runtime.eval.protocol import video_r1_mra

    assert video_r1_mra(pred, gt) == pytest.approx(want, abs=1e-6)
    assert _mra_float32(pred, gt) == pytest.approx(want, abs=1e-6)


MRA_09 = float(np.float32(0.9))  # 9 of 10 thresholds, as the script's float32 mean gives it
VIDEO_R1_ROWS = [  # (problem_type, output, solution, reward of reward_fn)
    ("regression", "<answer>9</answer>", "<answer>10</answer>", MRA_09),
    ("regression", "<answer>11</answer>", "<answer>10</answer>", MRA_09),
    ("regression", "<answer>19</answer>", "<answer>20</answer>", 1.0),
    ("regression", "<answer>3</answer>", "<answer>0</answer>", 0.0),
    ("numerical", "<answer>1,000</answer>", "<answer>1,000</answer>", 1.0),
    ("numerical", "1000", "<answer>1,000</answer>", 0.0),  # no tags: the whole output; decimal-ness differs
    ("multiple choice", "I think B", "<answer>B</answer>", 0.0),  # missing tags: the whole output, not equal
    ("multiple choice", "<answer>B</answer>", "<answer>B</answer>", 1.0),
    ("OCR", "<answer>STOP</answer>", "<answer>STOP</answer>", 0.0),
    ("free-form", "<answer>a red ball</answer>", "<answer>a red ball</answer>", 0.0),
]


def test_rescore_video_r1_output_files(tmp_path, capsys):
    f = tmp_path / "grpo_output.json"
    f.write_text(json.dumps({"results": [{"problem_type": t, "output": o, "solution": s, "problem_id": 1}
                                         for t, o, s, _ in VIDEO_R1_ROWS], "final_acc": [{"mean_acc": 0.0}]}))
    assert eval_main(["--rescore", str(f), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["files"][0]
    want = [r for *_, r in VIDEO_R1_ROWS]
    assert got["rewards"] == want and got["n"] == len(want)
    acc = [r for t, *_, r in VIDEO_R1_ROWS if t != "regression"]
    mra = [r for t, *_, r in VIDEO_R1_ROWS if t == "regression"]
    assert got["acc"] == pytest.approx(sum(acc) / len(acc)) and got["mra"] == pytest.approx(sum(mra) / len(mra))
    assert got["rewards"][:3] == [pytest.approx(0.9), pytest.approx(0.9), 1.0]  # where numpy's arange gave less
    assert eval_main(["--rescore", str(f), "--protocol", "video-r1-reward", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["rewards"][-2:] == [1.0, 1.0]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert eval_main(["--rescore", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a Video-R1 output file" in err[0]


def test_duplicate_ids_all_count_and_samples_jsonl_rescores(engine_dir, tmp_path, capsys):
    from models.samples import sample_video

    sample_video(tmp_path / "clip.mp4", seconds=1.0)
    rows = [{"problem_id": 7, "problem": " Which way? ", "solution": "<answer>A</answer>", "path": "clip.mp4",
             "problem_type": "multiple choice", "data_type": "video", "options": ["A. left", "B. right"]}] * 3
    data = tmp_path / "dup.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "o"
    args = ["--engine", str(engine_dir), "--data", str(data), "--out", str(out), "--method", "base",
            "--max-new-tokens", "4", *TINY_BUDGET]
    assert eval_main(args) == 0
    assert "3 to run, 0 done earlier" in capsys.readouterr().err
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2] and all(r["id"] == "7" for r in recs)
    assert json.loads((out / "summary.json").read_text())["methods"]["base"]["n"] == 3
    assert recs[0]["video_frames"] > 0 and len(recs[0]["frame_size"]) == 2 and recs[0]["prompt_tokens"] > 0


SAMPLES = [  # (method, problem_type, text, solution, reward under video-r1-reward, under video-r1)
    ("base", "multiple choice", "<think>it moves</think><answer>B</answer>", "<answer>B</answer>", 1.0, 1.0),
    ("base", "multiple choice", "<answer>A</answer>", "<answer>B</answer>", 0.0, 0.0),
    ("base", "numerical", "<answer>3</answer>", "<answer>3</answer>", 1.0, 1.0),
    ("base", "numerical", "<answer>4</answer>", "<answer>3</answer>", 0.0, 0.0),
    ("base", "regression", "<answer>107</answer>", "<answer>100</answer>", MRA_09, MRA_09),
    ("base", "OCR", "<answer>stop here</answer>", "<answer>stop here</answer>", 1.0, 0.0),
    ("base", "free-form", "<answer>a red ball</answer>", "<answer>a red ball</answer>", 1.0, 0.0),
    ("vreason", "multiple choice", "<answer>B</answer>", "<answer>B</answer>", 1.0, 1.0),
    ("vreason", "numerical", "<answer>2.5</answer>", "<answer>3</answer>", 0.0, 0.0),
    ("vreason", "regression", "<answer>100</answer>", "<answer>100</answer>", 1.0, 1.0),
    ("vreason", "OCR", "<answer>go</answer>", "<answer>stop here</answer>", 0.0, 0.0),
    ("vreason", "free-form", "<answer>nothing</answer>", "<answer>a red ball</answer>", 0.0, 0.0),
]


@pytest.mark.parametrize("protocol", ["video-r1-reward", "video-r1"])
def test_rescore_of_a_samples_file_with_known_right_and_wrong_answers(tmp_path, capsys, protocol):
    """samples.jsonl records (as runtime.eval writes them) with answers known right or wrong for every problem
    type and two methods: the rewards, the means and the per-method split."""
    col = 4 if protocol == "video-r1-reward" else 5
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps({"index": i, "method": m, "problem_type": t, "text": text, "solution": sol,
                                     "options": [], "answer": extract_answer(text)}) + "\n"
                         for i, (m, t, text, sol, *_) in enumerate(SAMPLES)))
    assert eval_main(["--rescore", str(f), "--protocol", protocol, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["files"][0]
    assert got["rewards"] == [row[col] for row in SAMPLES]
    for method in ("base", "vreason"):
        rows = [row for row in SAMPLES if row[0] == method]
        acc = [row[col] for row in rows if row[1] != "regression"]
        part = got["methods"][method]
        assert part["n"] == len(rows) and part["acc"] == pytest.approx(sum(acc) / len(acc))
        assert part["mra"] == [row[col] for row in rows if row[1] == "regression"][0]
    assert eval_main(["--rescore", str(f), "--protocol", protocol]) == 0
    table = capsys.readouterr().out
    assert "| base | 7 |" in table and "| vreason | 5 |" in table


def test_a_broken_jsonl_line_is_named_by_its_number(tmp_path, capsys):
    f = tmp_path / "samples.jsonl"
    good = json.dumps({"method": "base", "problem_type": "numerical", "text": "<answer>1</answer>",
                       "solution": "<answer>1</answer>"})
    f.write_text(f"{good}\n\n{good}\n{{half a record\n")
    assert eval_main(["--rescore", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 4 is not JSON" in err[0]


def test_the_question_is_not_stripped_under_video_r1():
    from models.prompt import user_text
    from runtime.eval.protocol import prompt

    q, options, template = prompt("video-r1", " Which way? ", "numerical", [])
    assert user_text(q, template, options).startswith(" Which way? \nPlease think")


def test_video_r1_budget_gives_its_frames_and_tokens(tmp_path):
    """640x480 and 1280x720 clips of 10 s at 30 fps under Video-R1's rule: 16 frames, 280x364 (130 tokens per two
    frames) and 224x420 (120), and they fit an export with the default limits of a checkpoint with
    Qwen2.5-VL's real pixel settings."""
    from export.exporter import export_model
    from models.samples import render_frames, write_video
    from models.tiny import make_checkpoint
    from runtime.reasoner import Reasoner

    ckpt = make_checkpoint(tmp_path / "ckpt")
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):  # Qwen2.5-VL's released values
        cfg = json.loads((ckpt / name).read_text())
        cfg.update(min_pixels=3136, max_pixels=12845056)
        if name.startswith("video"):
            cfg.update(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
        (ckpt / name).write_text(json.dumps(cfg))
    engine = export_model(ckpt, tmp_path / "engine", quiet=True, validate=False)
    r = Reasoner.load(engine, backend="ort")
    from runtime.eval.protocol import VIDEO_R1_BUDGET
    for (h, w), want, tokens in (((480, 640), [280, 364], 130), ((720, 1280), [224, 420], 120)):
        frames = render_frames("circle", "red", "right", 300, (h, w))
        clip = write_video(tmp_path / f"{h}.mp4", frames, 30.0)
        p = r.prepare(question="Which way?", video=clip, template="plain", **VIDEO_R1_BUDGET)
        v = p.visuals[0].describe(r.cfg)
        assert v["frames"] == 16 and v["frame_size"] == want and v["tokens"] == 8 * tokens


def test_a_crash_inside_a_sample_is_recorded_and_a_half_written_line_is_redone(engine_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    from runtime.reasoner import Reasoner

    out = tmp_path / "eval"
    args = ["--engine", str(engine_dir), "--sample", "--out", str(out), "--max-new-tokens", "4", "--method", "base",
            "--limit", "3", *TINY_BUDGET]
    real = Reasoner.ask
    calls = []

    def flaky(self, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return real(self, **kw)

    monkeypatch.setattr(Reasoner, "ask", flaky)
    assert eval_main(args) == 0
    err = capsys.readouterr().err
    assert "1 answers failed" in err and "RuntimeError: CUDA error" in err
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["error_kind"] for r in recs] == [None, "failed", None]
    s = json.loads((out / "summary.json").read_text())["methods"]["base"]
    assert s["failed"] == 1 and s["refused"] == 0 and s["problems"]["shapes"]["failed"] == 1
    assert "1 failed" in (out / "results.md").read_text()
    # a crash while writing leaves half a line: dropped with a warning, that sample runs again
    text = (out / "samples.jsonl").read_text()
    (out / "samples.jsonl").write_text(text[: -len(text.splitlines()[-1]) // 2 - 1])
    assert eval_main(args) == 0
    err = capsys.readouterr().err
    assert "half-written line" in err and "1 to run, 1 done earlier, 1 refused or failed earlier" in err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    # a corrupt run.json: one line naming it and --overwrite
    (out / "run.json").write_text("{")
    assert eval_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json is corrupt" in err[0] and "--overwrite" in err[0]
    assert eval_main(args + ["--overwrite"]) == 0


def test_a_refusal_names_the_binding_limit(engine_dir):
    from models.errors import InputError
    from runtime.reasoner import Reasoner

    r = Reasoner.load(engine_dir, backend="ort")
    with pytest.raises(InputError, match="prompt limit .* --max-prompt"):
        r.prepare(question="x " * (r.limits["max_prompt"] + 10), template="plain")
    with pytest.raises(InputError, match="context limit .* --max-context"):
        r.prepare(question="x", template="plain", max_new_tokens=r.limits["max_context"])


def test_a_run_where_every_sample_was_refused_fails_and_a_rerun_says_refused_earlier(engine_dir, tmp_path, capsys):
    """Videos under Video-R1's frame and pixel budget on an export that takes 1024 vision patches: every sample is
    refused. The run exits 1 naming the limit; a rerun says they were refused earlier and how to retry them."""
    from models.samples import sample_video

    sample_video(tmp_path / "clip.mp4", seconds=2.0, fps=8.0)
    rows = [{"problem_id": i, "problem": "Which way?", "solution": "<answer>A</answer>", "path": "clip.mp4",
             "problem_type": "multiple choice", "data_type": "video", "options": ["A. left", "B. right"]}
            for i in range(2)]
    data = tmp_path / "videos.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "o"
    args = ["--engine", str(engine_dir), "--data", str(data), "--out", str(out), "--method", "base"]
    assert eval_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "none of the 2 answers was given" in err[-1] and "this export takes at most 1024" in err[-1]
    assert eval_main(args) == 1
    err = capsys.readouterr().err
    assert "0 to run, 0 done earlier, 2 refused or failed earlier" in err and "--retry-refused" in err
    assert eval_main([*args, "--retry-refused", *TINY_BUDGET]) == 1  # the budget is a setting: another run
    assert "other settings" in capsys.readouterr().err
    assert eval_main([*args, "--retry-refused"]) == 1
    assert "2 to run, 0 done earlier" in capsys.readouterr().err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4  # the retries appended, the last counts


def test_a_broken_line_of_a_jsonl_data_file_is_named(tmp_path):
    good = json.dumps({"problem": "q", "solution": "<answer>A</answer>", "path": "a.mp4",
                       "problem_type": "multiple choice", "data_type": "video"})
    f = tmp_path / "set.jsonl"
    f.write_text(f"{good}\n{good}\n\n{{oops\n")
    with pytest.raises(InputError, match="line 4 is not JSON"):
        load_samples(f)
