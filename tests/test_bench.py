"""python -m runtime.bench on the tiny export: the report's fields (timings are reported, never asserted)."""

from __future__ import annotations

import json

import pytest

from runtime.bench.__main__ import main as bench_main
from runtime.bench.exports import first_difference, reuse_line


def test_bench_json_fields(engine_dir, tiny, tmp_path, capsys):
    assert bench_main(["--engine", str(engine_dir), "--model", str(tiny), "--backend", "ort", "--repeats", "1",
                       "--warmup", "0", "--new-tokens", "6", "--seconds", "1", "--work", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["decode_tokens_per_s"]) == {"ort", "transformers"}
    assert set(rep["prefill_tokens_per_s"]) == {"ort", "transformers"}
    assert set(rep["decode_roofline_fraction"]) == {"ort", "transformers"}
    for key in ("vreason_token_time_ratio", "vreason_peak_memory_ratio", "vreason_update_cost_head_passes"):
        assert rep[key] > 0
    assert isinstance(rep["vreason_first_use_bytes"], int)  # what V-Reason's first request left held
    assert rep["weight_bytes_per_token"] > 0 and rep["machine"]["read_bandwidth_gb_s"] > 0
    u = rep["reuse"]  # what reuse saves, measured in the same run (ratios reported, not asserted)
    assert u["tokens_equal_without_reuse"] and u["max_entropy_difference"] <= 1e-6
    assert u["first_different_token"] is None
    assert u["reused_vision_patches_half_overlap"] == 4  # of the shifted window's 8 temporal patches
    assert 0 < u["reused_prompt_tokens_second_question"] < u["prompt_tokens"]
    assert u["second_question_ttft_ratio"] > 0 and u["half_overlap_vision_ratio"] > 0


def test_reuse_line_says_where_answers_part():
    """Answers that part (an int4 export: ONNX Runtime's int8-activation kernel rounds a row a little differently
    by batch size) are reported by the first token that differs and the entropy distance before it."""
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    u = {"prompt_tokens": 669, "ttft_first_s": 2.0, "second_question_ttft_ratio": 0.2, "same_question_ttft_ratio": 0.02,
         "reused_prompt_tokens_second_question": 547, "half_overlap_vision_ratio": 0.5,
         "reused_vision_patches_half_overlap": 4, "tokens_equal_without_reuse": False, "first_different_token": 20,
         "max_entropy_difference": 4.8e-4}
    assert reuse_line(u, "ort").endswith("answers without reuse part at token 20 (entropy within 4.8e-04 before that)")
    u.update(tokens_equal_without_reuse=True, first_different_token=None, max_entropy_difference=0.0)
    assert reuse_line(u, "ort").endswith("answers equal without reuse (entropy within 0.0e+00)")


def test_concurrency_bench_on_the_tiny_export(engine_dir, tmp_path, capsys):
    from runtime.bench.__main__ import main as bench
    from runtime.bench.concurrency import concurrency_table

    png = tmp_path / "concurrency.png"
    assert bench(["--engine", str(engine_dir), "--concurrency", "1", "3", "--new-tokens", "4", "--repeats", "2",
                  "--work", str(tmp_path), "--backend", "ort", "--json", "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    rep = json.loads(out)
    assert err.strip().splitlines()[-1] == f"plot: {png}" and png.stat().st_size > 10_000
    for method in ("base", "vreason"):
        one, three = rep["methods"][method]
        assert (one["clients"], one["requests"], three["clients"], three["requests"]) == (1, 2, 3, 6)
        assert one["identical_to_solo"] and three["identical_to_solo"]
        assert three["tokens"] == 3 * one["tokens"] and three["aggregate_over_one_client"] > 0
        # the decode ratio is taken per repeat (each wave over the one-client wave just before it)
        assert one["decode_over_one_client"] == one["decode_over_one_client_min"] == 1.0
        if three["decode_over_one_client"] is not None:  # (4 tokens: a wave may have no window where all decode)
            assert three["decode_over_one_client_min"] <= three["decode_over_one_client"] \
                <= three["decode_over_one_client_max"]
        assert 0 <= three["queue_p50_s"] and three["ttft_p50_s"] <= three["ttft_p95_s"]
    assert rep["max_batch"] == 3  # the top level's clients all run at once (default 4 capped 8 clients' rate to 0)
    # with fewer places than clients, they never all decode at once: no aggregate decode rate, said as "-"
    assert bench(["--engine", str(engine_dir), "--concurrency", "1", "3", "--max-batch", "2", "--new-tokens", "4",
                  "--repeats", "1", "--work", str(tmp_path), "--backend", "ort", "--json", "--no-peer"]) == 0
    out, err = capsys.readouterr()
    rep = json.loads(out)
    three = rep["methods"]["base"][1]
    assert rep["max_batch"] == 2 and three["identical_to_solo"] and three["batch_mean"] <= 2
    assert three["aggregate_decode_tokens_per_s"] is None and three["decode_over_one_client"] is None
    assert "never all decoding at once" in err and "| base | 3 |" in concurrency_table(rep)
    assert "| - | - |" in concurrency_table(rep).split("| base | 3 |")[1].splitlines()[0]
    assert bench(["--engine", str(engine_dir), "--concurrency", "0"]) == 1
    capsys.readouterr()
    # the plot is of the --concurrency report: refused at once without it
    assert bench(["--engine", str(engine_dir), "--plot", str(tmp_path / "x.png")]) == 1
    assert "pass --concurrency" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_serve_bench_on_the_tiny_export(engine_dir, tmp_path, capsys):
    pytest.importorskip("uvicorn")
    from runtime.bench.serve import main as serve_bench

    assert serve_bench(["--engine", str(engine_dir), "--backend", "ort", "--rounds", "2", "--new-tokens", "4",
                        "--clients", "2", "--work", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rounds"] == 2 and rep["ttft_api_s"] > 0 and rep["ttft_server_s"] > 0
    assert rep["decode_server_over_api"] > 0 and rep["aggregate_server_over_api"] > 0


def test_synthetic_requests_decoded_together_on_cpu(capsys):
    """``--synthetic NAME --concurrency``: N requests' decode steps in the torch backend's batched calls, static (a
    pool of a power of two rows: 3 requests on 4) and dynamic, each level's aggregate rate and its ratio to the
    first level's."""
    assert bench_main(["--synthetic", "small", "--device", "cpu", "--prompt-tokens", "40", "--new-tokens", "3",
                       "--concurrency", "1", "3", "--repeats", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["levels"] == [1, 3] and rep["cuda_graphs"] is False
    for path in ("static", "dynamic"):
        agg = rep["aggregate_decode_tokens_per_s"][path]
        assert set(agg) == {"1", "3"} and all(v > 0 for v in agg.values())
        assert rep["aggregate_over_first_level"][path]["1"] == 1.0
        assert rep["per_request_decode_tokens_per_s"][path]["3"] == pytest.approx(agg["3"] / 3)
