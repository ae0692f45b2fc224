"""Evaluation harness: answer extraction, metrics, file formats, path safety, resume, the sample set end to end."""

from __future__ import annotations

import json

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


def test_sample_set_end_to_end_and_resume(engine_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--engine", str(engine_dir), "--sample", "--out", str(out), "--max-new-tokens", "6",
            "--method", "base", "vreason"]
    assert eval_main(args) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 14 * 2
    rec = json.loads(lines[0])
    for key in ("dataset", "id", "method", "answer", "tokens", "metric", "score", "ema", "latency_s", "error",
                "file_sha"):
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
            "--limit", "2"]
    assert eval_main(args) == 0
    before = (out / "samples.jsonl").read_text()
    for changed, name in ((["--max-new-tokens", "5"], "max_new_tokens"), (["--vreason-lr", "0.5"], "controller"),
                          (["--temperature", "0.7", "--seed", "1"], "sampling"),
                          (["--protocol", "lenient"], "protocol"), (["--max-frames", "2"], "max_frames")):
        capsys.readouterr()
        assert eval_main(args + changed) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0] and name in err[0] and "--overwrite" in err[0]
        assert (out / "samples.jsonl").read_text() == before
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
    from runtime.eval.protocol import video_r1_score

    metric, value = video_r1_score(ptype, output, solution)
    assert metric == ("mra" if ptype == "regression" else "acc")
    assert value == pytest.approx(want)


def test_a_bad_sample_is_recorded_and_the_run_goes_on(engine_dir, tmp_path):
    rows = [{"problem_id": 0, "problem": "q", "solution": "<answer>A</answer>", "path": "../escape.mp4",
             "problem_type": "multiple choice", "data_type": "video", "options": ["A. x"]},
            {"problem_id": 1, "problem": "q", "solution": "<answer>1</answer>", "path": "missing.mp4",
             "problem_type": "numerical", "data_type": "video"}]
    data = tmp_path / "set.json"
    data.write_text(json.dumps(rows))
    assert eval_main(["--engine", str(engine_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                      "--method", "base"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert "leaves --video-root" in recs[0]["error"] and "does not exist" in recs[1]["error"]
    assert all(r["score"] == 0 for r in recs)
